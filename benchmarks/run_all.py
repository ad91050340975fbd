"""Runs every benchmark side by side and writes `benchmarks/latest.json`.

    python benchmarks/run_all.py --quick            # CPU, about 5 minutes on 2 cores
    python benchmarks/run_all.py --size 1b --dtype bfloat16   # the standard scenario: 1B Llama, ViT-L/14-336
    python benchmarks/run_all.py --device cuda      # GPU: bf16, Llama-2-7B and ViT-L/14-336 shapes

latest.json holds the machine (CPU or GPU, threads, load average before and after), versions, every script's
results and the headline ratios: ttft_ratio_vs_llava, decode_ratio_vs_bare_llm,
stage1_cache_speedup and stage1_cache_ideal_speedup (images; `_video` for 8-frame clips), video_decode_speedup (8
frames of a 10 s H.264 clip with a keyframe every 2 s, against `load_video`), audio_features_speedup (CLAP log-mel
of 10 s clips, batched against `ClapFeatureExtractor`). Its "Latest run" section of
benchmarks/RESULTS.md is then rewritten from it (`render_results.py`); the dated notes below it are written by hand.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_audio_features  # noqa: E402
import bench_inference  # noqa: E402
import bench_processor  # noqa: E402
import bench_training  # noqa: E402
import bench_video_decode  # noqa: E402
import render_results  # noqa: E402
from common import DTYPES, ROOT, SIZES  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name and the matmul extensions that decide bf16 speed (AVX-512 BF16, AMX)."""
    with open("/proc/cpuinfo") as cpuinfo:
        lines = cpuinfo.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    extensions = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX"), ("avx2", "AVX2"))
                  if flag in flags]
    return f"{model or 'CPU'} ({', '.join(extensions) or 'no AVX2'})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short CPU run of every benchmark")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=SIZES, help="model shapes of the inference benchmark")
    parser.add_argument("--dtype", choices=DTYPES, help="precision (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s in that precision, for the "
                        "training benchmark's MFU (known: H100, H200, A100 in bfloat16)")
    parser.add_argument("--output", default=str(ROOT / "latest.json"), help="where to write the combined JSON")
    parser.add_argument("--results_md", default=str(ROOT / "RESULTS.md"),
                        help="the Markdown file whose latest-run section is rewritten from it")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    common = ["--device", args.device, *(["--quick"] if args.quick else []), *(["--dtype", args.dtype] if args.dtype else [])]
    inference = ["--size", args.size] if args.size else []
    results = {
        "inference": bench_inference.main(common + inference + ["--output", str(ROOT / "inference.json")]),
        "training": bench_training.main(common + ["--output", str(ROOT / "training.json")]
                                        + (["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else [])),
        "processor": bench_processor.main(common + ["--output", str(ROOT / "processor.json")]),
        "video_decode": bench_video_decode.main([*(["--quick"] if args.quick else []),
                                                 "--output", str(ROOT / "video_decode.json")]),
        "audio_features": bench_audio_features.main([*(["--quick"] if args.quick else []),
                                                     "--output", str(ROOT / "audio_features.json")]),
    }
    headline = {key: results[part][key] for part, keys in (
        ("inference", ("ttft_ratio_vs_llava", "decode_ratio_vs_bare_llm")),
        ("training", ("stage1_cache_speedup", "stage1_cache_ideal_speedup", "stage1_cache_speedup_video",
                      "stage1_cache_ideal_speedup_video")),
        ("video_decode", ("video_decode_speedup",)), ("audio_features", ("audio_features_speedup",))) for key in keys}
    on_gpu = args.device.startswith("cuda")
    machine = {"name": torch.cuda.get_device_name() if on_gpu else cpu_name(), "threads": torch.get_num_threads(),
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    packages = ("torch", "transformers", "datasets", "peft", "av")
    output = {**headline, "headline": list(headline), "date": datetime.date.today().isoformat(), "machine": machine,
              "quick": args.quick, "versions": {"python": platform.python_version(),
                                                **{package: version(package) for package in packages}},
              "results": results}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    render_results.write(output, Path(args.results_md))
    print("\nHeadline ratios: " + ", ".join(f"{key} {value:.3f}" for key, value in headline.items()))
    print(f"Wrote {args.output} and its section of {args.results_md}")


if __name__ == "__main__":
    main()
