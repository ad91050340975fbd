"""Preprocessing against consumption: items/s the processor prepares per modality and items/s the model encodes and
projects from the same batch, so a data loader's needs can be read off.

    python benchmarks/bench_processor.py [--quick] [--device cuda]

Inputs are what users have: 320x256 photos, 2 s clips of 320x240 frames at 8 fps, 10 s of 16 kHz audio (resampled
to CLAP's 48 kHz) and 10 s of 100 Hz IMU readings (resampled to 200 Hz). The model side is the ViT-B/16 tower (cpu
shapes) or ViT-L/14-336 (7b shapes), CLAP's HTSAT audio tower and the IMU encoder, each with its projector.
"""

import json

import numpy as np
import torch
from PIL import Image

from transformers_anymal import MODALITIES, AnyMALForConditionalGeneration

from common import AUDIO_TOKEN_ID, IMU_TOKEN_ID, anymal_config, median_seconds, parse_args, print_table, processor_for


def raw_items(name: str, count: int, rng) -> tuple[list, dict]:
    if name == "image":
        return [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(count)], {}
    if name == "video":
        return [rng.integers(0, 256, (16, 240, 320, 3), dtype=np.uint8) for _ in range(count)], {}
    if name == "audio":
        return [0.1 * rng.standard_normal(160_000).astype(np.float32) for _ in range(count)], {"sampling_rate": 16_000}
    return [rng.standard_normal((1000, 6)) for _ in range(count)], {"imu_sampling_rate": 100}


def rates(name: str, model, processor, batch_size: int, repeats: int, device: str, dtype, rng) -> dict:
    """Items/s the processor prepares from raw inputs, and items/s the model encodes and projects once prepared."""
    items, options = raw_items(name, batch_size, rng)
    argument = {"image": "images", "video": "videos", "audio": "audio", "imu": "imu"}[name]
    text = MODALITIES[name].token * batch_size
    prepared = processor(text=text, **{argument: items}, **options)[MODALITIES[name].input_name].to(device, dtype)
    prepare_s = median_seconds(lambda: processor(text=text, **{argument: items}, **options), "cpu", repeats)

    def consume():
        with torch.inference_mode():
            model.get_modality_features(name, prepared)

    return {"processor_items_per_s": batch_size / prepare_s,
            "model_items_per_s": batch_size / median_seconds(consume, device, repeats)}


def main(argv=None) -> dict:
    args = parse_args(__doc__, "processor.json", argv)
    device, dtype, size = args.device, args.dtype, args.size
    batch_size, repeats = (4, 2) if args.quick else (16, 5)
    torch.manual_seed(0)
    config = anymal_config(size, num_frames=8, audio_config={"model_type": "clap_audio_model"}, audio_token_id=AUDIO_TOKEN_ID,
                           imu_config={}, imu_token_id=IMU_TOKEN_ID)
    model = AnyMALForConditionalGeneration(config).to(device, dtype).eval()
    processor = processor_for(config)

    results, rows, rng = {}, [], np.random.default_rng(0)
    for name in config.modalities:
        results[name] = rates(name, model, processor, batch_size, repeats, device, dtype, rng)
        prepare, consume = results[name]["processor_items_per_s"], results[name]["model_items_per_s"]
        rows.append([name, f"{prepare:.1f}", f"{consume:.1f}", f"{prepare / consume:.2f}"])
    print_table(f"Processor vs model ({size} shapes, {device}, batch {batch_size}; ratio >= 1: one preprocessing "
                "process keeps up)", ["modality", "processor items/s", "model items/s", "ratio"], rows)
    output = {"device": device, "size": size, "results": results}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    return output


if __name__ == "__main__":
    main()
