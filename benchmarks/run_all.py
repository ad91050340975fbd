"""Runs every benchmark side by side and writes `benchmarks/latest.json`.

    python benchmarks/run_all.py --quick            # CPU, about 5 minutes on 2 cores
    python benchmarks/run_all.py --size 1b --dtype bfloat16   # the standard scenario: 1B Llama, ViT-L/14-336
    python benchmarks/run_all.py --device cuda      # GPU: bf16, Llama-2-7B and ViT-L/14-336 shapes

latest.json holds every script's results and the headline ratios: ttft_ratio_vs_llava, decode_ratio_vs_bare_llm,
stage1_cache_speedup and stage1_cache_ideal_speedup (images; `_video` for 8-frame clips), video_decode_speedup (8
frames of a 10 s H.264 clip with a keyframe every 2 s, against `load_video`). benchmarks/RESULTS.md records runs with
their machine, versions and date.
"""

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import transformers


sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_inference  # noqa: E402
import bench_processor  # noqa: E402
import bench_training  # noqa: E402
import bench_video_decode  # noqa: E402
from common import DTYPES, ROOT, SIZES  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short CPU run of every benchmark")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=SIZES, help="model shapes of the inference benchmark")
    parser.add_argument("--dtype", choices=DTYPES, help="precision (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--output", default=str(ROOT / "latest.json"), help="where to write the combined JSON")
    args = parser.parse_args()
    common = ["--device", args.device, *(["--quick"] if args.quick else []), *(["--dtype", args.dtype] if args.dtype else [])]
    inference = ["--size", args.size] if args.size else []
    results = {
        "inference": bench_inference.main(common + inference + ["--output", str(ROOT / "inference.json")]),
        "training": bench_training.main(common + ["--output", str(ROOT / "training.json")]),
        "processor": bench_processor.main(common + ["--output", str(ROOT / "processor.json")]),
        "video_decode": bench_video_decode.main([*(["--quick"] if args.quick else []),
                                                 "--output", str(ROOT / "video_decode.json")]),
    }
    headline = {key: results[part][key] for part, keys in (
        ("inference", ("ttft_ratio_vs_llava", "decode_ratio_vs_bare_llm")),
        ("training", ("stage1_cache_speedup", "stage1_cache_ideal_speedup", "stage1_cache_speedup_video",
                      "stage1_cache_ideal_speedup_video")),
        ("video_decode", ("video_decode_speedup",))) for key in keys}
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    output = {**headline, "date": datetime.date.today().isoformat(), "machine": machine, "quick": args.quick,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()}, "results": results}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    print("\nHeadline ratios: " + ", ".join(f"{key} {value:.3f}" for key, value in headline.items()))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
