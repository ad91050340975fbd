"""Streaming from WebDataset shards against the same rows in memory, and stage 1 on a streamed feature cache
against stage 1 on the fly, in the same interleaved rounds (alternating their order).

    python benchmarks/bench_streaming.py [--quick] [--num_workers 1]

The data: image-caption pairs (320x256 JPEG photos) written as 4 WebDataset shards, read with the recipes'
`--streaming` path (`load_streaming_dataset`), and the very rows that stream yields held in a `datasets.Dataset` in
memory. Input: a pass of a DataLoader whose workers decode and preprocess (AnyMALDataCollator) each batch, for both;
`streaming_vs_in_memory` is streaming samples/s over in-memory samples/s (target >= 0.8). Stage 1: a pass of
training steps of the projectors (forward, backward, AdamW) on the batches of that DataLoader, on the fly (encoders
run every step) against a cache of the same shards written by `examples/cache_features.py --streaming` and streamed
back; `stage1_stream_cache_speedup` is cached samples/s over on-the-fly samples/s.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from transformers_anymal import AnyMALDataCollator, AnyMALForConditionalGeneration
from transformers_anymal.streaming_anymal import load_streaming_dataset
from transformers_anymal.training_anymal import load_dataset_dict

from common import ROOT, anymal_config, interleaved_seconds, parse_args, print_table, processor_for, write_jpegs


sys.path.insert(0, str(ROOT.parent / "examples"))
import cache_features  # noqa: E402


def write_shards(folder: Path, count: int, shards: int = 4) -> str:
    """`count` image-caption samples as WebDataset shards, as img2dataset writes them (.jpg, .txt)."""
    import io
    import tarfile

    (folder / "photos").mkdir()
    photos = write_jpegs(folder / "photos", count, 320, 256)
    (folder / "shards").mkdir()
    for shard in range(shards):
        with tarfile.open(folder / "shards" / f"train-{shard:05d}.tar", "w") as tar:
            for index in range(shard, count, shards):
                for extension, data in (("jpg", Path(photos[index]).read_bytes()),
                                        ("txt", f"photo number {index}".encode())):
                    info = tarfile.TarInfo(f"{index:08d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "shards")


def one_pass(rows, collator, batch_size: int, num_workers: int, step=None) -> int:
    """Iterates a DataLoader over `rows` once (with `step` on each batch); the number of samples it gave."""
    samples = 0
    for batch in DataLoader(rows, batch_size=batch_size, collate_fn=collator, num_workers=num_workers):
        samples += len(batch["input_ids"])
        if step is not None:
            step(batch)
    return samples


def main(argv=None) -> dict:
    args = parse_args(__doc__, "streaming.json", argv,
                      num_workers=(int, 1, "DataLoader workers that decode and preprocess, in every arm"))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    count, batch_size, repeats = (32, 8, 3) if args.quick else (128, 16, 5)
    config = anymal_config("cpu")
    processor = processor_for(config)
    collator = AnyMALDataCollator(processor)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        shards = write_shards(folder, count)
        stream = load_streaming_dataset(shards)["train"]
        in_memory = Dataset.from_list(list(stream))
        passes = {"streaming": lambda: one_pass(stream, collator, batch_size, args.num_workers),
                  "in_memory": lambda: one_pass(in_memory, collator, batch_size, args.num_workers)}
        seconds = {name: float(np.median(values)) for name, values in interleaved_seconds(passes, "cpu", repeats).items()}
        results["input"] = {f"{name}_samples_per_s": count / value for name, value in seconds.items()}
        results["streaming_vs_in_memory"] = seconds["in_memory"] / seconds["streaming"]

        torch.manual_seed(0)
        model = AnyMALForConditionalGeneration(config)
        model.save_pretrained(folder / "model")
        processor.save_pretrained(folder / "model")
        cache_features.main(["--model_name_or_path", str(folder / "model"), "--dataset_name", shards, "--streaming",
                             "--num_workers", str(args.num_workers), "--output_dir", str(folder / "cache"),
                             "--batch_size", str(batch_size)])
        cache = load_dataset_dict(str(folder / "cache"), streaming=True)["train"]
        model.set_trainable(projectors=["image"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        passes = {"on_the_fly": lambda: one_pass(stream, collator, batch_size, args.num_workers, step),
                  "cached": lambda: one_pass(cache, collator, batch_size, args.num_workers, step)}
        seconds = {name: float(np.median(values)) for name, values in interleaved_seconds(passes, "cpu", repeats).items()}
        results["stage1"] = {f"{name}_samples_per_s": count / value for name, value in seconds.items()}
        results["stage1_stream_cache_speedup"] = seconds["on_the_fly"] / seconds["cached"]

    results.update(samples=count, batch_size=batch_size, num_workers=args.num_workers, rounds=repeats,
                   threads=torch.get_num_threads())
    print_table("Streaming (samples/s, one pass, median of interleaved rounds)", ["measure", "samples/s", "", "samples/s", "ratio"], [
        ["input: streaming vs in memory", f"{results['input']['streaming_samples_per_s']:.1f}", "vs",
         f"{results['input']['in_memory_samples_per_s']:.1f}", f"{results['streaming_vs_in_memory']:.2f}"],
        ["stage 1: streamed cache vs on the fly", f"{results['stage1']['cached_samples_per_s']:.1f}", "vs",
         f"{results['stage1']['on_the_fly_samples_per_s']:.1f}", f"{results['stage1_stream_cache_speedup']:.2f}"],
    ])
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
