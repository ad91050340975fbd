"""The latest benchmark run as Markdown, written from `latest.json` alone, into RESULTS.md's "Latest run" section.

    python benchmarks/render_results.py            # print the section from benchmarks/latest.json
    python benchmarks/render_results.py --write    # and put it into benchmarks/RESULTS.md

`run_all.py` does `--write` after every run, so the figures in that section are the JSON's; the notes in RESULTS.md
below it (why a target is missed, what was profiled) are written by hand and dated.
"""

import argparse
import json
from pathlib import Path


ROOT = Path(__file__).resolve().parent
BEGIN = "<!-- latest run: written by benchmarks/render_results.py from latest.json; edits here are overwritten -->"
END = "<!-- end of latest run -->"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def render(latest: dict) -> str:
    results, machine = latest["results"], latest["machine"]
    lines = [f"## Latest run: {latest['date']}{' (`--quick`)' if latest['quick'] else ''}", "",
             f"Machine: {machine['name']}; {machine['threads']} threads; load average {machine['load_before']:.2f} "
             f"before, {machine['load_after']:.2f} after. Versions: "
             + ", ".join(f"{name} {version}" for name, version in latest["versions"].items()) + ".", ""]
    inference = results["inference"]
    lines += [f"Inference, {inference['size']} shapes, {inference['dtype'].removeprefix('torch.')}, TTFT median (range) of "
              f"{inference['repeats']} interleaved rounds:", ""]
    rows = [[scenario, name, row["prompt_tokens"], f"{1000 * row['ttft_s']:.0f} ({1000 * row['ttft_min_s']:.0f}-"
             f"{1000 * row['ttft_max_s']:.0f})", f"{row['decode_tokens_per_s']:.1f}", f"{row['peak_memory_mb']:.0f}"]
            for scenario, contenders in inference["results"].items() if scenario != "bare LLM"
            for name, row in contenders.items()]
    bare = inference["results"]["bare LLM"]
    rows.append(["same tokens", "bare LLM", bare["prompt_tokens"], f"{1000 * bare['ttft_s']:.0f}",
                 f"{bare['decode_tokens_per_s']:.1f}", f"{bare['peak_memory_mb']:.0f}"])
    lines += table(["scenario", "model", "prompt tokens", "TTFT ms", "decode tok/s", "peak MB"], rows)
    training = results["training"]
    lines += [f"Stage 1, {training['size']} shapes: on the fly (media decoded from files) against cached features "
              "read from disk and the same features in memory (ideal), interleaved:", ""]
    stage1 = {kind: row for kind, row in training["results"].items() if kind != "stage2"}
    counted = all("cached_flops" in row for row in stage1.values())
    lines += table(["media", "on the fly /s", "cached /s", "ideal /s", "speed-up", "ideal", "recovered",
                    *(["TFLOP/s fly/cached", "MFU fly/cached"] if counted else [])], [
        [kind, f"{row['on_the_fly_samples_per_s']:.2f}", f"{row['cached_samples_per_s']:.2f}",
         f"{row['ideal_samples_per_s']:.2f}", f"{row['speedup']:.2f}×", f"{row['ideal_speedup']:.2f}×",
         f"{row['speedup'] / row['ideal_speedup']:.0%}",
         *([f"{row['on_the_fly_flops']['tflops_per_s']:.3f}/{row['cached_flops']['tflops_per_s']:.3f}",
            f"{mfu(row['on_the_fly_flops'])}/{mfu(row['cached_flops'])}"] if counted else [])]
        for kind, row in stage1.items()])
    stage2 = training["results"]["stage2"]
    lines += ["Stage 2, LoRA against QLoRA (4-bit NF4 language model):", ""]
    lines += table(["stage 2", "samples/s", "peak MB", *(["TFLOP/s", "MFU"] if counted else [])], [
        [name, f"{row['samples_per_s']:.2f}", f"{row['peak_mb']:.0f}",
         *([f"{row['tflops_per_s']:.3f}", mfu(row)] if counted else [])] for name, row in stage2.items()])
    if counted:
        peak = training["peak_tflops"]
        lines += [f"Training in {training['dtype']}. TFLOP/s: the matmul and attention FLOPs a step executes, forward "
                  "and backward, per second; MFU: that over the device's peak ("
                  + (f"{peak} TFLOP/s)." if peak else "none given or known for this device: `--peak_tflops`)."), ""]
    processor = results["processor"]
    lines += ["Items per second the processor prepares against those the model encodes and projects:", ""]
    lines += table(["modality", "processor items/s", "model items/s", "ratio"], [
        [name, f"{row['processor_items_per_s']:.1f}", f"{row['model_items_per_s']:.1f}",
         f"{row['processor_items_per_s'] / row['model_items_per_s']:.2f}"] for name, row in processor["results"].items()])
    video = results["video_decode"]
    lines += ["Video decoding, 10 s 640×360 30 fps clip to 8 frames, one core, clips/s:", ""]
    lines += table(["encoding", "load_video", "read_sampled_frames", "speed-up"], [
        [name, f"{row['load_video_clips_per_second']:.1f}", f"{row['read_sampled_frames_clips_per_second']:.1f}",
         f"{row['speedup']:.2f}×"] for name, row in video["results"].items()])
    if audio := results.get("audio_features"):  # runs before it was measured have none
        lines += ["CLAP log-mel features of 10, 7 and 3 s clips at 48 kHz, one core, clips/s:", ""]
        lines += table(["settings", "ClapFeatureExtractor", "batched", "speed-up", "max difference dB"], [
            [name, f"{row['extractor_clips_per_second']:.1f}", f"{row['batched_clips_per_second']:.1f}",
             f"{row['speedup']:.2f}×", f"{row['max_difference_db']:.1e}"] for name, row in audio["results"].items()])
    headline = [[key, f"{latest[key]:.3f}"] for key in latest["headline"]]
    lines += ["Headline ratios:", "", *table(["ratio", "value"], headline)]
    return "\n".join(lines).rstrip() + "\n"


def mfu(rate: dict) -> str:
    return "-" if rate["mfu"] is None else f"{rate['mfu']:.1%}"


def write(latest: dict, results_md: Path = ROOT / "RESULTS.md"):
    """Replaces RESULTS.md's latest-run section (or inserts it after the title) with `render(latest)`."""
    text = results_md.read_text()
    section = f"{BEGIN}\n{render(latest)}{END}"
    if BEGIN in text:
        before, rest = text.split(BEGIN, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        title, _, rest = text.partition("\n## ")
        text = f"{title.rstrip()}\n\n{section}\n\n## {rest}"
    results_md.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latest", nargs="?", default=str(ROOT / "latest.json"), help="run_all.py's JSON")
    parser.add_argument("--write", action="store_true", help="put the section into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    latest = json.loads(Path(args.latest).read_text())
    if args.write:
        write(latest)
    print(render(latest), end="")


if __name__ == "__main__":
    main()
