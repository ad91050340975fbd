"""Training side by side: stage 1 with the encoders on the fly against cached features, stage 2 LoRA against QLoRA.

    python benchmarks/bench_training.py [--quick] [--device cuda]

A stage-1 step is collation plus forward, backward and an optimizer step of the projectors, in three arms measured
in the same interleaved rounds (alternating their order): on the fly, the media are decoded from files (320x256
JPEG photos, 2 s H.264 clips of 320x240 at 8 fps), preprocessed and encoded in every step; cached, the encoder
features are read from a cache on disk written with `examples/cache_features.py`'s columns and read as the recipes
read it; ideal, the same features are already in memory, so the step does only what caching cannot remove.
`stage1_cache_ideal_speedup` is on-the-fly over ideal, `stage1_cache_speedup` on-the-fly over cached, and their
ratio how much of the ideal caching recovers. Images and 8-frame videos are measured separately. Stage 2 compares
LoRA on a full-precision LLM with QLoRA on a 4-bit one (bitsandbytes).
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


def train_step(model, optimizer, collator, batch_rows, device):
    batch = collator(batch_rows)
    batch = {key: ({k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device))
             for key, value in batch.items()}
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def stage1(kind: str, model, processor, device, batch_size: int, repeats: int, folder: Path) -> dict:
    collator = AnyMALDataCollator(processor)
    from_files = [{"messages": chat(kind), f"{kind}s": [path]} for path in write_media(folder, kind, batch_size)]
    with torch.no_grad():
        values = collator(from_files)[MODALITIES[kind].input_name].to(device)
        features = model.model.get_encoder_features(kind, values).cpu().numpy()
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
    }


def stage2(model_dir: str, processor, device, batch_size: int, repeats: int, quantized: bool) -> dict:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
                                      if device == "cpu" else torch.bfloat16) if quantized else None
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                     device_map={"": device} if quantized else None).to(device)
    model = get_peft_model(model, lora_config(model, ModelConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator, batch = AnyMALDataCollator(processor), image_rows(batch_size, np.random.default_rng(1))
    step = median_seconds(lambda: train_step(model, optimizer, collator, batch, device), device, repeats)
    peak = peak_memory_bytes(lambda: train_step(model, optimizer, collator, batch, device), device)
    return {"samples_per_s": batch_size / step, "peak_mb": peak / 2**20}


def main(argv=None) -> dict:
    args = parse_args(__doc__, "training.json", argv)
    device, size = args.device, args.size
    batch_size, repeats = (2, 1) if args.quick else (8, 5)
    torch.manual_seed(0)
    config = anymal_config(size, num_frames=8)
    model = AnyMALForConditionalGeneration(config).to(device)
    processor = processor_for(config)

    stage1_repeats = max(repeats, 3)  # the headline ratio: worth a few more steps even in a quick run
    with tempfile.TemporaryDirectory() as folder:
        results = {kind: stage1(kind, model, processor, device, batch_size, stage1_repeats, Path(folder))
                   for kind in ("image", "video")}
    print_table(f"Stage 1: encoders on the fly vs cached features ({size} shapes, {device}, batch {batch_size})",
                ["media", "on the fly /s", "cached /s", "speed-up", "ideal", "recovered", "peak MB fly/cached"],
                [[kind, f"{r['on_the_fly_samples_per_s']:.2f}", f"{r['cached_samples_per_s']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['speedup'] / r['ideal_speedup']:.0%}",
                  f"{r['on_the_fly_peak_mb']:.0f}/{r['cached_peak_mb']:.0f}"] for kind, r in results.items()])

    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        del model
        results["stage2"] = {name: stage2(model_dir, processor, device, batch_size, repeats, quantized)
                             for name, quantized in (("LoRA", False), ("QLoRA", True))}
    print_table("Stage 2: LoRA vs QLoRA (4-bit NF4 language model)", ["method", "samples/s", "peak MB"],
                [[name, f"{r['samples_per_s']:.2f}", f"{r['peak_mb']:.0f}"] for name, r in results["stage2"].items()])
    output = {"device": device, "size": size, "results": results,
              "stage1_cache_speedup": results["image"]["speedup"],
              "stage1_cache_ideal_speedup": results["image"]["ideal_speedup"],
              "stage1_cache_speedup_video": results["video"]["speedup"],
              "stage1_cache_ideal_speedup_video": results["video"]["ideal_speedup"]}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    return output


if __name__ == "__main__":
    main()
