"""Reading cached encoder features against decoding and preprocessing the images they came from, on one core.

    python benchmarks/bench_feature_cache.py [--quick]

Stage 1 on a feature cache is only as fast as the cache can be read. A cache of CLIP ViT-L/14-336 features (577 x 1024
per image) is written with `examples/cache_features.py`'s column types (flat items and their shape), in fp16 and in
fp32, and read back in batches the way the recipes read it: `load_dataset_dict` (features as numpy arrays), row by
row, into `AnyMALDataCollator`. Beside it, in the same interleaved rounds: nested items (each a list of 577 lists)
in the same numpy format, the flat cache in datasets' default Python format (every number a Python float), and JPEG
files decoded and preprocessed for ViT-L/14-336 (CLIPImageProcessor at 336 px), which is what stage 1 does without a
cache. Samples per second are medians over the rounds, with one thread.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, List, Value, load_from_disk
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor

from transformers_anymal import AnyMALDataCollator
from transformers_anymal.training_anymal import load_dataset_dict

from common import ROOT, median_seconds, parse_args, print_table, write_jpegs


sys.path.insert(0, str(ROOT.parent / "examples"))
from cache_features import feature_columns, feature_values  # noqa: E402


SEQUENCE, WIDTH = 577, 1024  # ViT-L/14 at 336 px: 24 x 24 patches and the class token
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "a handwritten seven"}]


def write_cache(folder: Path, rows: int, dtype: str, nested: bool = False) -> Path:
    """A cache as `examples/cache_features.py` writes it (flat items and their shape), or with nested items."""
    rng = np.random.default_rng(0)
    items = [rng.standard_normal((SEQUENCE, WIDTH)).astype(dtype) for _ in range(rows)]
    if nested:
        features = Features({"image_features": List(List(List(Value(dtype))))})
        data = {"image_features": [[item] for item in items]}
    else:
        features = Features(feature_columns("image", dtype))
        data = feature_values("image", [[item] for item in items])
    path = folder / f"{dtype}{'-nested' * nested}"
    Dataset.from_dict(data, features=features).save_to_disk(path)
    return path


def main(argv=None) -> dict:
    args = parse_args(__doc__, "feature_cache.json", argv)
    torch.set_num_threads(1)
    rows, batch_size, repeats = (32, 8, 3) if args.quick else (128, 16, 5)
    processor = AutoProcessor.from_pretrained(ROOT.parent / "hub_configs" / "anymal-tiny")
    collator = AnyMALDataCollator(processor)
    clip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        caches = {dtype: write_cache(folder, rows, dtype) for dtype in ("float16", "float32")}
        jpegs = write_jpegs(folder, rows, 640, 480)

        def read(dataset):
            def run():
                for start in range(0, rows, batch_size):
                    batch = [{**dataset[index], "messages": CHAT} for index in range(start, start + batch_size)]
                    assert collator(batch)["encoder_features"]["image"].shape == (batch_size, SEQUENCE, WIDTH)
            return run

        def decode_and_preprocess():
            for start in range(0, rows, batch_size):
                images = [Image.open(path).convert("RGB") for path in jpegs[start : start + batch_size]]
                clip(images, return_tensors="pt")

        nested = write_cache(folder, rows, "float16", nested=True)
        arms = {f"cache {dtype}, as the recipes read it": read(load_dataset_dict(path, from_disk=True))
                for dtype, path in caches.items()}
        arms["cache float16, nested items, numpy format"] = read(load_dataset_dict(nested, from_disk=True))
        arms["cache float16, Python format"] = read(load_from_disk(caches["float16"]))
        arms["JPEG decode + ViT-L/14-336 preprocessing"] = decode_and_preprocess
        seconds = {name: [] for name in arms}
        for _ in range(repeats):  # interleaved, so that the machine's load falls on every arm alike
            for name, arm in arms.items():
                seconds[name].append(median_seconds(arm, "cpu", repeats=1, warmup=0))
    rates = {name: rows / float(np.median(times)) for name, times in seconds.items()}
    jpeg = rates["JPEG decode + ViT-L/14-336 preprocessing"]
    print_table(f"ViT-L/14-336 samples per second on one core ({rows} rows, batches of {batch_size}, median of {repeats})",
                ["path", "samples/s", "vs JPEG"], [[name, f"{rate:.1f}", f"{rate / jpeg:.2f}x"] for name, rate in rates.items()])
    results = {
        "cached_fp16_samples_per_second": rates["cache float16, as the recipes read it"],
        "cached_fp32_samples_per_second": rates["cache float32, as the recipes read it"],
        "nested_items_fp16_samples_per_second": rates["cache float16, nested items, numpy format"],
        "python_format_fp16_samples_per_second": rates["cache float16, Python format"],
        "jpeg_preprocess_samples_per_second": jpeg,
        "rows": rows, "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads(),
    }
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
