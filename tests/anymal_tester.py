"""Builds the tiny AnyMAL of `hub_configs/anymal-tiny` and random, correctly expanded inputs for it."""

from pathlib import Path

import numpy as np
import torch

from transformers_anymal import MODALITIES, AnyMALConfig, AnyMALForConditionalGeneration


TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "anymal-tiny"
FIRST_SPECIAL_ID = 4  # ids below are <unk>, <s>, </s>, <pad>
FREE_DIMS = {"audio": (1, 100)}  # sizes of the dims a spec leaves free: CLAP's (channels, frames)


def tiny_config(**overrides) -> AnyMALConfig:
    return AnyMALConfig.from_pretrained(TINY, **overrides)


def tiny_model(config: AnyMALConfig | None = None, seed: int = 0) -> AnyMALForConditionalGeneration:
    torch.manual_seed(seed)
    return AnyMALForConditionalGeneration(config or tiny_config()).eval()


def random_item(config: AnyMALConfig, name: str, generator: torch.Generator) -> torch.Tensor:
    """One item of `name` with the shape the model's encoder takes."""
    encoder_config = config.get_encoder_config(name)
    spec = MODALITIES[name]
    shape = [getattr(encoder_config, field) if field else None for field in spec.item_shape]
    if spec.has_frames:
        shape[0] = config.num_frames
    free = iter(FREE_DIMS.get(name, ()))
    return torch.randn([size or next(free) for size in shape], generator=generator)


def make_inputs(config: AnyMALConfig, samples: list[list[str]], seed: int = 0, text_length: int = 3) -> dict:
    """Model inputs for a batch: each sample is a list of segments, "text" or a modality name, in prompt order.

    Text segments are random ordinary tokens; each modality segment is one item (a run of placeholders). Samples
    are left-padded as for generation.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = min(spec_id for spec_id in (getattr(config, f"{n}_token_id") for n in config.modalities))
    rows, items = [], {name: [] for name in config.modalities}
    for segments in samples:
        ids = []
        for segment in segments:
            if segment == "text":
                ids += torch.randint(FIRST_SPECIAL_ID, vocab, (text_length,), generator=generator).tolist()
            else:
                ids += [getattr(config, f"{segment}_token_id")] * config.num_tokens[segment]
                items[segment].append(random_item(config, segment, generator))
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    pad = config.text_config.pad_token_id
    inputs = {
        "input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows]),
    }
    for name, tensors in items.items():
        if tensors:
            inputs[MODALITIES[name].input_name] = torch.stack(tensors)
    return inputs


def write_image(path, size=(40, 50), seed=0) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_audio(path, seconds=1.0, sampling_rate=16000, seed=0) -> str:
    import soundfile

    soundfile.write(path, 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sampling_rate)), sampling_rate)
    return str(path)


def write_video(path, gray_levels=tuple(range(0, 240, 12)), fps=10, size=32, codec="mpeg4",
                keyframe_interval=None) -> str:
    """A video file (its container from the file name) whose frame i is uniformly gray at level gray_levels[i], so
    sampled frames can be identified."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = keyframe_interval
        for level in gray_levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


ANSWERS = {"image": "a digit", "imu": "running", "both": "a digit and running", "text": "hello"}


def make_chat_dataset(path, rows: int = 16, seed: int = 0):
    """A DatasetDict saved to `path`: chats over an image, an IMU recording, both, or none, with short answers."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for index in range(rows):
        kind = list(ANSWERS)[index % len(ANSWERS)]
        blocks = [{"type": "image"}] * (kind in ("image", "both")) + [{"type": "imu"}] * (kind in ("imu", "both"))
        records.append({
            "kind": kind,
            "messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[kind]}]}],
            "images": [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))] * (kind in ("image", "both")),
            "imus": [rng.standard_normal((6, 200)).tolist()] * (kind in ("imu", "both")),
        })
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:4])}).save_to_disk(path)
    return str(path)


def make_webdataset_shards(folder, shards: int = 4, per_shard: int = 6, media: tuple = ("jpg", "npy"),
                           seed: int = 0) -> str:
    """WebDataset shards `train-0000N.tar` in `folder`, as img2dataset writes them: each sample a `.txt` caption and
    the `media` files (of `.jpg`, `.flac`, `.mp4`, `.npy` IMU with its rate in the `.json`; datasets wants every
    sample of a dataset to have the same files), its `__key__` naming shard and position; every fourth sample carries
    its chat as `messages` in its `.json` instead of a caption."""
    import io
    import json
    import tarfile

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for position in range(per_shard):
                key = f"{shard:05d}{position:04d}"
                files = {}
                for extension in media:
                    path = folder / f"item.{extension}"
                    if extension == "jpg":
                        write_image(path, size=(24, 24), seed=int(rng.integers(1 << 30)))
                    elif extension == "flac":
                        write_audio(path, seconds=0.5, seed=int(rng.integers(1 << 30)))
                    elif extension == "mp4":
                        write_video(path, gray_levels=tuple(int(level) for level in rng.integers(0, 240, 6)))
                    else:
                        np.save(path, rng.standard_normal((6, 200)).astype(np.float32))
                    files[extension] = path.read_bytes()
                    path.unlink()
                blocks = [{"type": {"jpg": "image", "flac": "audio", "mp4": "video", "npy": "imu"}[extension]}
                          for extension in files]
                meta = {"imu_sampling_rate": 100}
                if position % 4 == 3:
                    meta["messages"] = [{"role": "user", "content": [*blocks, {"type": "text", "text": "What is it?"}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": f"sample {key}"}]}]
                files["txt"] = f"caption of sample {key}".encode()
                files["json"] = json.dumps(meta).encode()
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)
