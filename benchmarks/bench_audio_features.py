"""CLAP's log-mel features of 10 s clips at 48 kHz, on one core: `ClapFeatureExtractor` (each frame of each clip in
a Python loop) against the batched path the processor takes (`transformers_anymal.audio_features_anymal`).

    python benchmarks/bench_audio_features.py [--quick]

Both run with CLAP's own settings (`truncation="fusion"`, 64 mel bins) and with the `rand_trunc` settings of the
package's checkpoints, on the same clips: speech-like noise bursts, some shorter than the window (padded by repetition).
The largest difference between the two, in dB, is printed and must stay under 1e-4; clips per second are medians of
interleaved rounds, on one core.
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch
from transformers import ClapFeatureExtractor

from transformers_anymal.audio_features_anymal import clap_log_mel

from common import interleaved_seconds, on_one_core, parse_args, print_table


SETTINGS = {"fusion (CLAP's own)": {"truncation": "fusion"}, "rand_trunc (the package's checkpoints)": {"truncation": "rand_trunc"}}
TOLERANCE_DB = 1e-4


def clips(count: int, rate: int, rng) -> list[np.ndarray]:
    """10 s, 7 s and 3 s clips of noise under a syllable-rate envelope, with silent gaps."""
    out = []
    for index in range(count):
        seconds = (10, 7, 3)[index % 3]
        time = np.arange(seconds * rate) / rate
        envelope = np.clip(np.sin(2 * np.pi * 4 * time + index), 0, None) * (time % 2 < 1.6)
        out.append((0.2 * envelope * rng.standard_normal(time.size)).astype(np.float32))
    return out


def extract(extractor: ClapFeatureExtractor, batch: list[np.ndarray], options: dict) -> torch.Tensor:
    return extractor(batch, **options)["input_features"]


def main(argv=None) -> dict:
    args = parse_args(__doc__, "audio_features.json", argv)
    count, repeats = (4, 3) if args.quick else (16, 7)
    results, rows = {}, []
    with on_one_core():
        for name, settings in SETTINGS.items():
            extractor = ClapFeatureExtractor(**settings)
            rate = extractor.sampling_rate
            batch = clips(count, rate, np.random.default_rng(0))
            options = {"sampling_rate": rate, "return_tensors": "pt"}
            runs = {"ClapFeatureExtractor": functools.partial(extract, extractor, batch, options),
                    "batched": functools.partial(clap_log_mel, extractor, batch, options)}
            difference = (runs["ClapFeatureExtractor"]() - runs["batched"]()).abs().max().item()
            if difference >= TOLERANCE_DB:
                raise AssertionError(f"{name}: the batched features differ from the extractor's by {difference:.2e} dB")
            seconds = interleaved_seconds(runs, "cpu", repeats)
            before, after = (count / float(np.median(times)) for times in seconds.values())
            results[name] = {"extractor_clips_per_second": before, "batched_clips_per_second": after,
                             "speedup": after / before, "max_difference_db": difference}
            rows.append([name, f"{before:.1f}", f"{after:.1f}", f"{after / before:.2f}x", f"{difference:.1e}"])
    print_table(f"CLAP log-mel of {count} clips (10, 7 and 3 s at 48 kHz), clips per second on one core "
                f"(median of {repeats})", ["settings", "ClapFeatureExtractor", "batched", "speed-up", "max |diff| dB"],
                rows)
    output = {"results": results, "repeats": repeats,
              "audio_features_speedup": results["rand_trunc (the package's checkpoints)"]["speedup"]}
    Path(args.output).write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
