"""Shared by the benchmark scripts: model shapes, timing, peak memory and result tables."""

import argparse
import contextlib
import ctypes
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from transformers_anymal import AnyMALConfig, AnyMALForConditionalGeneration


ROOT = Path(__file__).resolve().parent
TINY = ROOT.parent / "hub_configs" / "anymal-tiny"
VOCAB = 32000
# the placeholders of anymal-tiny's tokenizer, so its processor can feed these larger models
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, AUDIO_TOKEN_ID, IMU_TOKEN_ID = 384, 385, 386, 387


SIZES = ("cpu", "1b", "7b")
DTYPES = ("float32", "bfloat16")


def text_config(size: str) -> dict:
    """`cpu`: a ~100M-parameter Llama; `1b`: Llama-3.2-1B's shapes (1.2B); `7b`: Llama-2-7B's shapes."""
    shapes = {"cpu": (768, 2048, 8, 12, 12), "1b": (2048, 8192, 16, 32, 8), "7b": (4096, 11008, 32, 32, 32)}[size]
    hidden, intermediate, layers, heads, kv_heads = shapes
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096}


def vision_config(size: str) -> dict:
    """`cpu`: CLIP ViT-B/16 at 224 px (196 patches); `1b`, `7b`: CLIP ViT-L/14 at 336 px as in LLaVA-1.5 (576
    patches)."""
    if size == "cpu":
        return {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
    return {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 336, "patch_size": 14}


def anymal_config(size: str, image_tokens: int = 64, **overrides) -> AnyMALConfig:
    """Image and video through the vision tower; `overrides` may add audio and IMU."""
    num_tokens = {"image": image_tokens, "video": image_tokens, "audio": 32, "imu": 32}
    return AnyMALConfig(text_config=text_config(size), image_config=vision_config(size), image_token_id=IMAGE_TOKEN_ID,
                        video_token_id=VIDEO_TOKEN_ID, num_tokens=num_tokens, resampler_depth=6,
                        resampler_num_heads=8, resampler_head_dim=64, **overrides)


def processor_for(config: AnyMALConfig):
    """anymal-tiny's processor with the vision preprocessing of `config`'s image tower."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY)
    size = config.image_config.image_size
    for sub_processor in (processor.image_processor, processor.video_processor):
        sub_processor.size, sub_processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
    processor.video_processor.num_frames = config.num_frames
    processor.num_tokens.update(config.num_tokens)
    return processor


def write_jpegs(folder: Path, count: int, width: int, height: int) -> list[str]:
    """`count` photo-sized JPEG files, smooth enough to compress like photos."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        paths.append(str(folder / f"{index}.jpg"))
        Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    return paths


def write_clip(path: Path, frames: int, width: int, height: int, fps: int, codec: str = "libx264",
               keyframe_interval: int | None = None) -> str:
    """A video file of a textured scene, twice the frame's width, panning 2 pixels a frame (so that inter frames have
    motion to code); `keyframe_interval` None keeps the encoder's default."""
    import av

    if 2 * frames > width:
        raise ValueError(f"{frames} frames would pan past the scene's {2 * width} pixels; at most {width // 2}.")
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (height // 8, 2 * width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = keyframe_interval
        if codec == "libx264":
            stream.options = {"preset": "veryfast"}
        for index in range(frames):
            frame = np.ascontiguousarray(scene[:, 2 * index: 2 * index + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def free_memory_bytes(device: str) -> int:
    """What `device` has free: the GPU's free memory, or the machine's available memory for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def refuse_what_does_not_fit(size: str, device: str, dtype: torch.dtype, image_tokens: int = 64):
    """Exits, saying what `size` needs, when AnyMAL, LLaVA and the bare LLM (three copies of the language model, two
    of the vision tower) would not fit in `device`'s free memory; the models are counted on the meta device."""
    with torch.device("meta"):
        anymal = AnyMALForConditionalGeneration(anymal_config(size, image_tokens))
        llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text_config(size).items() if k != "model_type"}))
    vision = sum(p.numel() for p in anymal.model.encoders["image"].parameters())
    parameters = 2 * sum(p.numel() for p in anymal.parameters()) + sum(p.numel() for p in llm.parameters()) - vision
    needed, free = parameters * dtype.itemsize, free_memory_bytes(device)
    if needed > 0.9 * free:
        raise SystemExit(
            f"--size {size} builds AnyMAL, LLaVA and the bare LLM side by side: {parameters / 1e9:.1f}B parameters, "
            f"{needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} before any activation, but {device} has "
            f"{free / 2**30:.1f} GiB free. Use --size cpu here, or --device cuda on a GPU with that much free memory "
            "(bf16 there)."
        )


def build_models(size: str, device: str, dtype: torch.dtype, image_tokens: int = 64):
    """AnyMAL, LLaVA and the bare LLM with the same language model weights and the same vision tower."""
    refuse_what_does_not_fit(size, device, dtype, image_tokens)
    torch.manual_seed(0)
    anymal = AnyMALForConditionalGeneration(anymal_config(size, image_tokens)).to(device, dtype).eval()
    llava = LlavaForConditionalGeneration(LlavaConfig(
        text_config=text_config(size), vision_config=vision_config(size), image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )).to(device, dtype).eval()
    bare = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text_config(size).items() if k != "model_type"}))
    bare = bare.to(device, dtype).eval()
    language_model = anymal.model.language_model.state_dict()
    llava.model.language_model.load_state_dict(language_model)
    llava.model.vision_tower.load_state_dict(anymal.model.encoders["image"].state_dict())
    bare.model.load_state_dict(language_model)
    for model in (llava, bare):
        model.lm_head.load_state_dict(anymal.lm_head.state_dict())
    return anymal, llava, bare


@contextlib.contextmanager
def on_one_core():
    """Runs the block on one core, with one torch thread (FFmpeg's and other native threads share that core too);
    restores the cores and threads after it."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(runs: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per repeat of each `runs[name]` (after one warm-up call each), taken in rounds that alternate their
    order, so that the machine's load and warm caches fall on every run alike."""
    for run in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for round_index in range(repeats):
        for name in list(runs)[:: 1 if round_index % 2 == 0 else -1]:
            seconds[name].append(median_seconds(runs[name], device, repeats=1, warmup=0))
    return seconds


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_memory_bytes(fn, device: str) -> int:
    """Peak memory `fn` adds: CUDA's allocator peak, or on CPU the resident set sampled every millisecond."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the resident set starts from what is live
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return max(peak[0], _rss_bytes()) - base


def print_table(title: str, header: list[str], rows: list[list]):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    for row in (header, ["-" * width for width in widths], *rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def parse_args(description: str, output_name: str, argv=None, **extra_options):
    """The options every benchmark takes: --quick, --device, --size, --output, plus `extra_options`
    (name -> (type, default, help))."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (CPU smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda)")
    parser.add_argument("--size", default=None, choices=SIZES,
                        help="model shapes: cpu (100M Llama, ViT-B/16), 1b (Llama-3.2-1B, ViT-L/14-336), 7b "
                             "(Llama-2-7B, ViT-L/14-336); default: cpu, or 7b on cuda")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="weights and activations (default: bfloat16 on cuda, float32 on cpu; CPUs with AMX run "
                             "bfloat16 matmuls several times faster than float32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core), fixed for the run")
    parser.add_argument("--output", default=str(ROOT / output_name), help="where to write the JSON results")
    for name, (kind, default, help_text) in extra_options.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=help_text)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or ("7b" if on_gpu else "cpu")
    args.dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if on_gpu else torch.float32
    args.threads = args.threads or len(os.sched_getaffinity(0))  # the cores this process may run on
    torch.set_num_threads(args.threads)
    return args
