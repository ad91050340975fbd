"""Streaming the demo's data from WebDataset shards against the same rows in memory, and stage 1 on a streamed
feature cache against stage 1 on the fly, per modality, in the same interleaved rounds (alternating their order).

    python benchmarks/bench_streaming.py [--quick] [--num_workers 1]

The data: captioned samples of each modality of the demo (examples/anymal_demo: digit cards, moving digits, spoken
digits, BasicMotions IMU recordings), written as WebDataset shards (one shard set per modality, 4 shards) by
`transformers_anymal.webdataset_anymal.write_webdataset`, as `examples/export_webdataset.py` does, and read with the
recipes' `--streaming` path (`load_streaming_dataset`); in memory: the very same rows as the demo holds them (a
`datasets.Dataset`, as `load_from_disk` gives it). The model: the demo's encoders and projectors around a small
language model, random weights. Input: a pass
of a DataLoader whose workers decode and preprocess (AnyMALDataCollator) each batch, for both;
`streaming_vs_in_memory` is streaming samples/s over in-memory samples/s (target >= 0.8). Stage 1: a pass of
training steps of the modality's projector (forward, backward, AdamW) on the batches of that DataLoader, on the fly
(the encoder runs every step) against a cache of the same shards written by `examples/cache_features.py --streaming`
and streamed back; `stage1_stream_cache_speedup` is cached samples/s over on-the-fly samples/s.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from transformers_anymal import AnyMALDataCollator, AnyMALForConditionalGeneration
from transformers_anymal.streaming_anymal import load_streaming_dataset
from transformers_anymal.training_anymal import load_dataset_dict
from transformers_anymal.webdataset_anymal import write_webdataset

from common import ROOT, interleaved_seconds, parse_args, print_table


sys.path.insert(0, str(ROOT.parent / "examples"))
import cache_features  # noqa: E402
from anymal_demo.data import build_demo_dataset, load_media  # noqa: E402
from anymal_demo.model import media_processor, tiny_anymal_config  # noqa: E402


MODALITIES = ("image", "video", "audio", "imu")


def one_pass(rows, collator, batch_size: int, num_workers: int, step=None) -> int:
    """Iterates a DataLoader over `rows` once (with `step` on each batch); the number of samples it gave."""
    samples = 0
    for batch in DataLoader(rows, batch_size=batch_size, collate_fn=collator, num_workers=num_workers):
        samples += len(batch["input_ids"])
        if step is not None:
            step(batch)
    return samples


def interleaved_medians(passes: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each pass in `passes`, over interleaved rounds (`common.interleaved_seconds`)."""
    return {name: float(np.median(values)) for name, values in interleaved_seconds(passes, "cpu", repeats).items()}


def measure(name: str, model, collator, folder: Path, in_memory, args, count: int, batch_size: int,
            repeats: int) -> dict:
    """Both comparisons for one modality, whose shard set is `<folder>/shards/<name>` and whose rows are `in_memory`."""
    stream = load_streaming_dataset(folder / "shards", name)["train"]
    seconds = interleaved_medians({"streaming": lambda: one_pass(stream, collator, batch_size, args.num_workers),
                                   "in_memory": lambda: one_pass(in_memory, collator, batch_size, args.num_workers)},
                                  repeats)
    results = {"input": {f"{arm}_samples_per_s": count / value for arm, value in seconds.items()},
               "streaming_vs_in_memory": seconds["in_memory"] / seconds["streaming"]}

    cache_features.main(["--model_name_or_path", str(folder / "model"), "--dataset_name", str(folder / "shards"),
                         "--dataset_config", name, "--streaming", "--num_workers", str(args.num_workers),
                         "--output_dir", str(folder / f"cache-{name}"), "--batch_size", str(batch_size)])
    cache = load_dataset_dict(str(folder / f"cache-{name}"), streaming=True)["train"]
    model.set_trainable(language_model=False, encoders=False, projectors=[name])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = interleaved_medians({"on_the_fly": lambda: one_pass(stream, collator, batch_size, args.num_workers, step),
                                   "cached": lambda: one_pass(cache, collator, batch_size, args.num_workers, step)},
                                  repeats)
    results["stage1"] = {f"{arm}_samples_per_s": count / value for arm, value in seconds.items()}
    results["stage1_stream_cache_speedup"] = seconds["on_the_fly"] / seconds["cached"]
    return results


def main(argv=None) -> dict:
    args = parse_args(__doc__, "streaming.json", argv,
                      num_workers=(int, 1, "DataLoader workers that decode and preprocess, in every arm"))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    count, batch_size, repeats = (16, 8, 2) if args.quick else (128, 16, 5)
    media = load_media(0)
    captions = build_demo_dataset(media, 0, videos_per_split={"train": count, "test": 1})["align"]
    kinds = captions["kind"]
    picked = {name: [index for index, kind in enumerate(kinds) if kind == name][:count] for name in MODALITIES}
    recordings = np.concatenate([recording for recording, _ in media["imu"]["train"]], axis=1)
    processor = media_processor(recordings.mean(1).tolist(), recordings.std(1).tolist())
    collator = AnyMALDataCollator(processor)
    torch.manual_seed(0)
    model = AnyMALForConditionalGeneration(tiny_anymal_config())
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rows = captions.select([index for name in MODALITIES for index in picked[name]])
        write_webdataset(rows, folder / "shards", samples_per_shard=count // 4)
        model.save_pretrained(folder / "model")
        processor.save_pretrained(folder / "model")
        for name in MODALITIES:
            results[name] = measure(name, model, collator, folder, captions.select(picked[name]), args, count,
                                    batch_size, repeats)

    results["lowest_streaming_vs_in_memory"] = min(results[name]["streaming_vs_in_memory"] for name in MODALITIES)
    results.update(samples_per_modality=count, batch_size=batch_size, num_workers=args.num_workers, rounds=repeats,
                   threads=torch.get_num_threads())
    print_table("Streaming the demo's data (samples/s, one pass, median of interleaved rounds)",
                ["modality", "streaming", "in memory", "ratio", "stage 1 cached", "on the fly", "speed-up"],
                [[name, f"{results[name]['input']['streaming_samples_per_s']:.1f}",
                  f"{results[name]['input']['in_memory_samples_per_s']:.1f}",
                  f"{results[name]['streaming_vs_in_memory']:.2f}",
                  f"{results[name]['stage1']['cached_samples_per_s']:.1f}",
                  f"{results[name]['stage1']['on_the_fly_samples_per_s']:.1f}",
                  f"{results[name]['stage1_stream_cache_speedup']:.2f}"] for name in MODALITIES])
    print(f"lowest streaming/in-memory ratio: {results['lowest_streaming_vs_in_memory']:.2f} (target >= 0.8)")
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
