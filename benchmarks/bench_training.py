"""Training side by side: stage 1 with the encoders on the fly against cached features, stage 2 LoRA against QLoRA.

    python benchmarks/bench_training.py [--quick] [--device cuda] [--dtype bfloat16] [--peak_tflops T]

A stage-1 step is collation plus forward, backward and an optimizer step of the projectors, in three arms measured
in the same interleaved rounds (alternating their order): on the fly, the media are decoded from files (320x256
JPEG photos, 2 s H.264 clips of 320x240 at 8 fps), preprocessed and encoded in every step; cached, the encoder
features are read from a cache on disk written with `examples/cache_features.py`'s columns and read as the recipes
read it; ideal, the same features are already in memory, so the step does only what caching cannot remove.
`stage1_cache_ideal_speedup` is on-the-fly over ideal, `stage1_cache_speedup` on-the-fly over cached, and their
ratio how much of the ideal caching recovers. Images and 8-frame videos are measured separately. Stage 2 compares
LoRA on a full-precision LLM with QLoRA on a 4-bit one (bitsandbytes).

Weights and activations are in `--dtype` (bfloat16 by default on a GPU, float32 on a CPU), with autocast to it as the
recipes' `--bf16` does. Every arm also reports the matmul and attention FLOPs one of its steps executes (counted by
`torch.utils.flop_counter`, forward and backward), their rate, and the model FLOPs utilisation: that rate over the
device's peak in that dtype (`--peak_tflops`, known for H100, H200 and A100 in bfloat16; otherwise not reported).
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features
from peft import get_peft_model
from PIL import Image
from transformers import AutoModelForMultimodalLM, BitsAndBytesConfig
from trl import ModelConfig

from transformers_anymal import MODALITIES, AnyMALDataCollator, AnyMALForConditionalGeneration
from transformers_anymal.training_anymal import load_dataset_dict, lora_config

from common import (
    ROOT,
    anymal_config,
    interleaved_seconds,
    median_seconds,
    parse_args,
    peak_memory_bytes,
    print_table,
    processor_for,
    write_clip,
    write_jpegs,
)


sys.path.insert(0, str(ROOT.parent / "examples"))
from cache_features import feature_columns, feature_values  # noqa: E402


CHAT = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "the digit seven moves to the left"}]


def image_rows(count: int, rng) -> list[dict]:
    """Chats over an in-memory 320x256 photo (stage 2's batches)."""
    image = Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))
    return [{"messages": chat("image"), "images": [image]} for _ in range(count)]


def chat(kind: str) -> list[dict]:
    user, assistant = CHAT
    return [{**user, "content": [{"type": kind}, *user["content"]]}, assistant]


def write_media(folder: Path, kind: str, count: int) -> list[str]:
    """Files as users have them: 320x256 JPEG photos, or 2 s H.264 clips of 320x240 at 8 fps."""
    if kind == "image":
        return write_jpegs(folder, count, 320, 256)
    return [write_clip(folder / f"{index}.mp4", 16, 320, 240, 8) for index in range(count)]


# dense bfloat16 tensor-core peaks (SXM boards), TFLOP/s; MFU elsewhere needs --peak_tflops
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0}


def peak_tflops(device: str, dtype: torch.dtype, given: float | None) -> float | None:
    """`given`, or the known peak of this GPU in bfloat16, or None (no MFU reported)."""
    if given or not device.startswith("cuda") or dtype != torch.bfloat16:
        return given
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for model, peak in PEAK_BF16_TFLOPS.items() if model in name), None)


def train_step(model, optimizer, collator, batch_rows, device):
    batch = collator(batch_rows)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    batch = {key: ({k: cast(v, device, dtype) for k, v in value.items()} if isinstance(value, dict)
                   else cast(value, device, dtype)) for key, value in batch.items()}
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def cast(tensor: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Onto `device`; media and features in the model's dtype, token ids and masks as they are."""
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)


def step_flops(step) -> int:
    """The matmul and attention FLOPs one call of `step` executes, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def utilisation(flops: int, seconds: float, peak: float | None) -> dict:
    rate = flops / seconds / 1e12
    return {"step_tflop": flops / 1e12, "tflops_per_s": rate, "mfu": rate / peak if peak else None}


def stage1(kind: str, model, processor, device, batch_size: int, repeats: int, folder: Path, peak: float | None) -> dict:
    collator = AnyMALDataCollator(processor)
    from_files = [{"messages": chat(kind), f"{kind}s": [path]} for path in write_media(folder, kind, batch_size)]
    with torch.no_grad():
        values = collator(from_files)[MODALITIES[kind].input_name].to(device)
        features = model.model.get_encoder_features(kind, values.to(model.dtype)).float().cpu().numpy()
    columns = feature_values(kind, [[item] for item in features])  # as examples/cache_features.py stores them
    Dataset.from_dict(columns, features=Features(feature_columns(kind, str(features.dtype)))).save_to_disk(
        folder / f"{kind}-features")
    cache = load_dataset_dict(str(folder / f"{kind}-features"), from_disk=True)
    in_memory = [{"messages": chat(kind), **{column: values[index] for column, values in columns.items()}}
                 for index in range(batch_size)]
    model.set_trainable(projectors=[kind])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    arms = {
        "on_the_fly": lambda: train_step(model, optimizer, collator, from_files, device),
        "cached": lambda: train_step(model, optimizer, collator,
                                     [{**cache[index], "messages": chat(kind)} for index in range(batch_size)], device),
        "ideal": lambda: train_step(model, optimizer, collator, in_memory, device),
    }
    seconds = interleaved_seconds(arms, device, repeats)
    on_the_fly, cached, ideal = (float(np.median(seconds[name])) for name in arms)
    return {
        "on_the_fly_samples_per_s": batch_size / on_the_fly, "cached_samples_per_s": batch_size / cached,
        "ideal_samples_per_s": batch_size / ideal, "speedup": on_the_fly / cached, "ideal_speedup": on_the_fly / ideal,
        "on_the_fly_peak_mb": peak_memory_bytes(arms["on_the_fly"], device) / 2**20,
        "cached_peak_mb": peak_memory_bytes(arms["cached"], device) / 2**20,
        "on_the_fly_flops": utilisation(step_flops(arms["on_the_fly"]), on_the_fly, peak),
        "cached_flops": utilisation(step_flops(arms["cached"]), cached, peak),
    }


def stage2(model_dir: str, processor, device, dtype, batch_size: int, repeats: int, quantized: bool,
           peak: float | None) -> dict:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
                                      ) if quantized else None
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype,
                                                     device_map={"": device} if quantized else None).to(device)
    model = get_peft_model(model, lora_config(model, ModelConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator, batch = AnyMALDataCollator(processor), image_rows(batch_size, np.random.default_rng(1))
    run = lambda: train_step(model, optimizer, collator, batch, device)  # noqa: E731
    step = median_seconds(run, device, repeats)
    return {"samples_per_s": batch_size / step, "peak_mb": peak_memory_bytes(run, device) / 2**20,
            **utilisation(step_flops(run), step, peak)}


def main(argv=None) -> dict:
    args = parse_args(__doc__, "training.json", argv, peak_tflops=(
        float, None, "the device's peak TFLOP/s in --dtype, for MFU (known: H100, H200, A100 in bfloat16)"))
    device, size, dtype = args.device, args.size, args.dtype
    peak = peak_tflops(device, dtype, args.peak_tflops)
    batch_size, repeats = (2, 1) if args.quick else (8, 5)
    torch.manual_seed(0)
    config = anymal_config(size, num_frames=8)
    model = AnyMALForConditionalGeneration(config).to(device, dtype)
    processor = processor_for(config)

    stage1_repeats = max(repeats, 3)  # the headline ratio: worth a few more steps even in a quick run
    with tempfile.TemporaryDirectory() as folder:
        results = {kind: stage1(kind, model, processor, device, batch_size, stage1_repeats, Path(folder), peak)
                   for kind in ("image", "video")}
    precision = str(dtype).removeprefix("torch.")
    print_table(f"Stage 1: encoders on the fly vs cached features ({size} shapes, {device}, {precision}, batch "
                f"{batch_size})",
                ["media", "on the fly /s", "cached /s", "speed-up", "ideal", "recovered", "peak MB fly/cached",
                 "TFLOP/s fly/cached", "MFU fly/cached"],
                [[kind, f"{r['on_the_fly_samples_per_s']:.2f}", f"{r['cached_samples_per_s']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['speedup'] / r['ideal_speedup']:.0%}",
                  f"{r['on_the_fly_peak_mb']:.0f}/{r['cached_peak_mb']:.0f}",
                  f"{r['on_the_fly_flops']['tflops_per_s']:.3f}/{r['cached_flops']['tflops_per_s']:.3f}",
                  f"{percent(r['on_the_fly_flops']['mfu'])}/{percent(r['cached_flops']['mfu'])}"]
                 for kind, r in results.items()])

    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        del model
        results["stage2"] = {name: stage2(model_dir, processor, device, dtype, batch_size, repeats, quantized, peak)
                             for name, quantized in (("LoRA", False), ("QLoRA", True))}
    print_table(f"Stage 2: LoRA vs QLoRA (4-bit NF4 language model), {precision}",
                ["method", "samples/s", "peak MB", "TFLOP/s", "MFU"],
                [[name, f"{r['samples_per_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['tflops_per_s']:.3f}",
                  percent(r["mfu"])] for name, r in results["stage2"].items()])
    output = {"device": device, "size": size, "dtype": precision, "peak_tflops": peak, "results": results,
              "stage1_cache_speedup": results["image"]["speedup"],
              "stage1_cache_ideal_speedup": results["image"]["ideal_speedup"],
              "stage1_cache_speedup_video": results["video"]["speedup"],
              "stage1_cache_ideal_speedup_video": results["video"]["ideal_speedup"]}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    return output


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


if __name__ == "__main__":
    main()
