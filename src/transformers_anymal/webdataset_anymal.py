"""Chat rows written as WebDataset shards, the format `--streaming` reads (`streaming_anymal.webdataset_row`) and
img2dataset writes: `.tar` files of samples, each sample a few files sharing a key, here its media files and a
`.json` holding its chat.

`datasets` wants every sample of a WebDataset to hold the same files, so rows go to one shard set per combination of
modalities (`image`, `video`, `audio`, `imu`, `image-audio`, ...), and a README.md names each set as a config:
`load_dataset(folder, "image", streaming=True)`, or `--dataset_name folder --dataset_config image` in the recipes.
Media are written losslessly, so a streamed sample decodes to the very values of its row: images as they were stored
(PNG for in-memory pictures), audio as FLAC when its samples are 16-bit values (WAV of float32 otherwise), frame
arrays as lossless H.264 (RGB) MP4, IMU recordings as `.npy` with their rate in the `.json`. Not part of the model's
code, so checkpoints loaded with `trust_remote_code` never need it.
"""

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .collator_anymal import bare_chat, chat_of_row
from .media_anymal import as_array
from .streaming_anymal import MEDIA_EXTENSIONS


MODALITY_ORDER = tuple(MEDIA_EXTENSIONS)  # image, video, audio, imu: of a shard set's name, e.g. image-audio
SHARD = "{split}-{index:05d}.tar"
VIDEO_FPS = 8  # the rate written for frame arrays, which do not carry one


def write_webdataset(rows: Iterable[dict], output_dir, split: str = "train", samples_per_shard: int = 1000,
                     sampling_rates: dict[str, int] | None = None, total: int | None = None) -> dict[str, int]:
    """Writes chat rows (as AnyMALDataCollator reads them) as WebDataset shards
    `<output_dir>/<modalities>/<split>-<n>.tar`, `samples_per_shard` samples each, and a README.md whose `configs`
    name every shard set in `output_dir`. A sample's key is its row's index. Returns the samples written per shard
    set.

    A row may hold one item per modality (a WebDataset sample has one file per extension); rows without media are
    refused too, since their chats teach no modality. Each shard is written whole and then renamed into place.
    """
    output_dir = Path(output_dir)
    writers: dict[str, ShardWriter] = {}
    for index, row in enumerate(tqdm(rows, total=total, desc=f"writing {split} as WebDataset", unit="sample")):
        files, chat = sample_files(row, index, sampling_rates or {})
        combination = "-".join(name for name in MODALITY_ORDER if name in chat["media"])
        if combination not in writers:
            writers[combination] = ShardWriter(output_dir / combination, split, samples_per_shard)
        writers[combination].add(f"{index:09d}", {**files, "json": json.dumps(chat["meta"]).encode()})
    for writer in writers.values():
        writer.close()
    write_readme(output_dir)
    return {combination: writer.samples for combination, writer in writers.items()}


class ShardWriter:
    """Samples into `<folder>/<split>-<n>.tar`, a new shard every `samples_per_shard` samples."""

    def __init__(self, folder: Path, split: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}.")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.split, self.samples_per_shard = folder, split, samples_per_shard
        self.samples, self.tar, self.partial = 0, None, None

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if self.samples % self.samples_per_shard == 0:
            self.close()
            name = SHARD.format(split=self.split, index=self.samples // self.samples_per_shard)
            self.partial = self.folder / f".{name}.partial"
            self.tar = tarfile.open(self.partial, "w")
        for extension, data in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.partial, self.folder / self.partial.name[1: -len(".partial")])
            self.tar = None


def write_readme(output_dir: Path) -> None:
    """README.md whose `configs` name each shard set in `output_dir`, with its splits."""
    configs = []
    for folder in sorted(path for path in output_dir.iterdir() if path.is_dir()):
        splits = sorted({path.name.rsplit("-", 1)[0] for path in folder.glob("*.tar")})
        files = "".join(f"  - split: {split}\n    path: {folder.name}/{split}-*.tar\n" for split in splits)
        configs.append(f"- config_name: {folder.name}\n  data_files:\n{files}")
    (output_dir / "README.md").write_text(
        "---\nconfigs:\n" + "".join(configs) + "---\n\nWebDataset shards of chats with media, one shard set (config) "
        "per combination of modalities, written by transformers-anymal's examples/export_webdataset.py.\n")


def sample_files(row: dict, index: int, sampling_rates: dict[str, int]) -> tuple[dict[str, bytes], dict]:
    """The files of row `index`'s sample by extension, and `{"media": modalities, "meta": its .json}`: the chat with
    bare media blocks and every content a list of blocks, plus `<modality>_sampling_rate` where files do not say it."""
    chat = chat_of_row(row, list(MODALITY_ORDER), sampling_rates, index, decode=False)
    files, meta, media = {}, {}, []
    for block in (block for message in chat if isinstance(message["content"], list) for block in message["content"]):
        name = block.get("type")
        if name not in MODALITY_ORDER:
            continue
        if name in media:
            raise ValueError(f"row {index} holds more than one {name}; a WebDataset sample has one file per "
                             "modality, so split the row or leave it out.")
        extension, files[extension] = media_file(name, block, index)
        media.append(name)
        if name == "imu":
            meta["imu_sampling_rate"] = block["sampling_rate"]
    if not media:
        raise ValueError(f"row {index} has no media; a WebDataset of chats here holds media with each sample.")
    return files, {"media": media, "meta": {"messages": bare_chat(chat), **meta}}


def media_file(name: str, block: dict, index: int) -> tuple[str, bytes]:
    """A media block's item as the extension and bytes of a file that decodes to the same values."""
    extension, data = _media_file(name, block, index)
    if extension not in MEDIA_EXTENSIONS[name]:
        raise ValueError(f"row {index}: its {name} is a .{extension} file, which streaming does not read as {name}; "
                         f"convert it to one of .{', .'.join(MEDIA_EXTENSIONS[name])}.")
    return extension, data


def _media_file(name: str, block: dict, index: int) -> tuple[str, bytes]:
    item = block.get(name)
    if item is None and block.get("path") is not None:
        item = block["path"]
    if item is None:
        raise ValueError(f"row {index}: its {name} block has no item (give it inline or in the row's media column); "
                         "URLs are not fetched here: download the files first.")
    if isinstance(item, dict) and item.get("bytes") is None and item.get("path"):  # datasets' undecoded files
        item = item["path"]
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        return path.suffix.lstrip(".").lower(), path.read_bytes()
    if isinstance(item, dict) and item.get("bytes") is not None:
        data = item["bytes"]
        extension = Path(item["path"]).suffix.lstrip(".").lower() if item.get("path") else None
        return extension or sniffed_extension(name, data, index), data
    if isinstance(item, bytes):
        return sniffed_extension(name, item, index), item
    if name == "image":
        return "png", png(item)
    if name == "video":
        return "mp4", lossless_mp4(np.asarray([as_array(frame) for frame in item], dtype=np.uint8))
    if block.get("sampling_rate") is None:
        raise ValueError(f"row {index}: its {name} recording has no sampling rate; add a `{name}_sampling_rate` "
                         "column or give it as {'array': ..., 'sampling_rate': ...}.")
    if name == "audio":
        return audio_file(np.asarray(as_array(item), dtype=np.float32), block["sampling_rate"])
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(as_array(item), dtype=np.float32), allow_pickle=False)
    return "npy", buffer.getvalue()


def sniffed_extension(name: str, data: bytes, index: int) -> str:
    if name == "image":
        image_format = Image.open(io.BytesIO(data)).format or "unknown"
        return {"JPEG": "jpg"}.get(image_format, image_format.lower())
    raise ValueError(f"row {index}: {name} bytes without a file name; give {{'bytes': ..., 'path': 'name.ext'}} so "
                     "their format is known.")


def png(image) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(as_array(image), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def lossless_mp4(frames: np.ndarray) -> bytes:
    """(frames, height, width, 3) uint8 as an MP4 of lossless RGB H.264, which decodes to the same pixels."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video is written from (frames, height, width, 3) uint8 frames, got {frames.shape}.")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        stream.options = {"qp": "0"}  # lossless
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def audio_file(samples: np.ndarray, sampling_rate: int) -> tuple[str, bytes]:
    """FLAC when the samples are 16-bit values (as read from 16-bit files), else WAV of float32: both lossless."""
    import soundfile

    scaled = samples * 32768
    sixteen_bit = bool(np.all(scaled == np.round(scaled))) and np.abs(scaled).max(initial=0) <= 32767
    buffer = io.BytesIO()
    if sixteen_bit:
        soundfile.write(buffer, samples, sampling_rate, format="FLAC", subtype="PCM_16")
        return "flac", buffer.getvalue()
    soundfile.write(buffer, samples, sampling_rate, format="WAV", subtype="FLOAT")
    return "wav", buffer.getvalue()


__all__ = ["write_webdataset"]
