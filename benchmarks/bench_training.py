"""Training side by side: stage 1 with the encoders on the fly against cached features, stage 2 LoRA against QLoRA.

    python benchmarks/bench_training.py [--quick] [--device cuda]

A stage-1 step is collation (media preprocessing, or cached features) plus forward, backward and an optimizer step
of the projectors. The ideal speed-up of caching is the on-the-fly step time over that time minus what the encoders
and the preprocessing take, all measured here; `stage1_cache_speedup / stage1_cache_ideal_speedup` is how much of it
caching recovers. Images and 8-frame videos are measured separately. Stage 2 compares LoRA on a full-precision LLM
with QLoRA on a 4-bit one (bitsandbytes).
"""

import json
import tempfile

import numpy as np
import torch
from peft import get_peft_model
from PIL import Image
from transformers import AutoModelForMultimodalLM, BitsAndBytesConfig
from trl import ModelConfig

from transformers_anymal import MODALITIES, AnyMALDataCollator, AnyMALForConditionalGeneration
from transformers_anymal.training_anymal import lora_config

from common import (
    anymal_config,
    median_seconds,
    parse_args,
    peak_memory_bytes,
    print_table,
    processor_for,
)


def rows(kind: str, count: int, rng) -> list[dict]:
    media = ([Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))] if kind == "image"
             else [rng.integers(0, 256, (16, 240, 320, 3), dtype=np.uint8)])
    return [{"messages": [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe it."}]},
                          {"role": "assistant", "content": "the digit seven moves to the left"}],
             f"{kind}s": media} for _ in range(count)]


def train_step(model, optimizer, collator, batch_rows, device):
    batch = collator(batch_rows)
    batch = {key: ({k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device))
             for key, value in batch.items()}
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def stage1(kind: str, model, processor, device, batch_size: int, repeats: int) -> dict:
    collator = AnyMALDataCollator(processor)
    raw = rows(kind, batch_size, np.random.default_rng(0))
    inputs = collator(raw)
    values = inputs[MODALITIES[kind].input_name].to(device)
    with torch.no_grad():
        features = model.model.get_encoder_features(kind, values).cpu()
    cached = [{"messages": row["messages"], f"{kind}_features": [item]} for row, item in zip(raw, features)]
    model.set_trainable(projectors=[kind])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    on_the_fly = median_seconds(lambda: train_step(model, optimizer, collator, raw, device), device, repeats)
    from_cache = median_seconds(lambda: train_step(model, optimizer, collator, cached, device), device, repeats)
    preprocessing = median_seconds(lambda: collator(raw), device, repeats) - median_seconds(
        lambda: collator(cached), device, repeats)

    def encode():
        with torch.no_grad():
            model.model.get_encoder_features(kind, values)

    encoders = median_seconds(encode, device, repeats)
    return {
        "on_the_fly_samples_per_s": batch_size / on_the_fly, "cached_samples_per_s": batch_size / from_cache,
        "speedup": on_the_fly / from_cache, "ideal_speedup": on_the_fly / max(on_the_fly - encoders - preprocessing, 1e-9),
        "encoder_s": encoders, "preprocessing_s": preprocessing,
        "on_the_fly_peak_mb": peak_memory_bytes(lambda: train_step(model, optimizer, collator, raw, device), device) / 2**20,
        "cached_peak_mb": peak_memory_bytes(lambda: train_step(model, optimizer, collator, cached, device), device) / 2**20,
    }


def stage2(model_dir: str, processor, device, batch_size: int, repeats: int, quantized: bool) -> dict:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
                                      if device == "cpu" else torch.bfloat16) if quantized else None
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                     device_map={"": device} if quantized else None).to(device)
    model = get_peft_model(model, lora_config(model, ModelConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator, batch = AnyMALDataCollator(processor), rows("image", batch_size, np.random.default_rng(1))
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
    results = {kind: stage1(kind, model, processor, device, batch_size, stage1_repeats) for kind in ("image", "video")}
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
