import re

import pytest

from anymal_tester import TINY
from child_process import run_python


EXAMPLES = TINY.parents[1] / "examples"


def run(script, *args):
    return run_python(EXAMPLES / script, *args, cwd=TINY.parents[1], timeout=300)


def test_demo_runs_on_the_tiny_config():
    output = run("demo.py", "--max_new_tokens", "3").stdout
    assert "random ones" in output
    for name, tokens in (("image", 8), ("video", 8), ("audio", 4), ("imu", 4)):
        assert any(line.startswith(name) and line.rstrip().endswith(str(tokens)) for line in output.splitlines())
    assert "generated 3 tokens" in output and "answer:" in output


def test_example_scripts_document_their_options():
    options = {
        "demo.py": ["--model_name_or_path", "--max_new_tokens", "--seed"],
        "convert_imu2clip_checkpoint.py": ["--checkpoint", "--output_dir", "--window_length", "--sampling_rate"],
        "cache_features.py": ["--model_name_or_path", "--dataset_name", "--dataset_from_disk", "--output_dir",
                              "--imu_sampling_rate", "--dtype", "--batch_size", "--device"],
        "plan_memory.py": ["--config", "--stage", "--dtype", "--load_in_4bit", "--load_in_8bit", "--use_bnb_nested_quant",
                           "--no_peft", "--lora_r", "--per_device_train_batch_size", "--sequence_length",
                           "--gradient_checkpointing", "--gpu_memory_gib"],
        "eval_anymal.py": ["--model_name_or_path", "--dataset_name", "--split", "--output_dir", "--batch_size",
                        "--max_new_tokens", "--group_by", "--zero_inputs", "--device"],
    }
    for script, names in options.items():
        help_text = run(script, "--help").stdout
        for name in names:  # each option has its own entry in the listing, not just a mention in the usage line
            assert re.search(rf"^\s+{name}\b", help_text, re.MULTILINE), (script, name)


QUICK_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("heavy imports:", sorted(name for name in ("torch", "transformers", "datasets") if name in sys.modules))
"""


def test_help_of_the_inference_scripts_answers_before_importing_torch():
    for script in ("demo.py", "eval_anymal.py", "cache_features.py", "export_webdataset.py"):
        output = run_python("-c", QUICK_HELP, EXAMPLES / script, cwd=TINY.parents[1], timeout=300).stdout
        assert "usage:" in output and output.rstrip().endswith("heavy imports: []"), (script, output[-300:])


def test_benchmarks_document_their_options():
    for script in ("run_all.py", "bench_inference.py", "bench_training.py", "bench_processor.py",
                   "bench_feature_cache.py", "bench_video_decode.py", "bench_streaming.py", "bench_audio_features.py"):
        result = run_python(TINY.parents[1] / "benchmarks" / script, "--help", timeout=300)
        assert "--quick" in result.stdout and "--device" in result.stdout


def test_the_training_benchmark_steps_in_the_dtype_asked_and_counts_the_flops_it_executes(monkeypatch):
    """`bench_training.py --dtype bfloat16` (a GPU's default) trains in bfloat16 and reports FLOPs, their rate, and MFU
    against the peak given or known for the GPU."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from transformers_anymal import AnyMALDataCollator

    from anymal_tester import tiny_model

    monkeypatch.syspath_prepend(str(TINY.parents[1] / "benchmarks"))
    import bench_training

    model = tiny_model().train().to(torch.bfloat16)
    model.set_trainable(projectors=["image"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(TINY))
    rows = bench_training.image_rows(2, np.random.default_rng(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    flops = bench_training.step_flops(lambda: bench_training.train_step(model, optimizer, collator, rows, "cpu"))
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(after[name].dtype == torch.bfloat16 for name in before)
    # at least the language model's linear layers, forward and backward, over the batch's tokens
    tokens = collator(rows)["input_ids"].numel()
    linear = sum(m.weight.numel() for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear))
    assert flops >= 2 * 2 * linear * tokens
    rate = bench_training.utilisation(flops, 0.5, peak=100.0)
    assert rate["tflops_per_s"] == flops / 0.5 / 1e12 and rate["mfu"] == rate["tflops_per_s"] / 100.0
    assert bench_training.utilisation(flops, 0.5, peak=None)["mfu"] is None
    assert bench_training.peak_tflops("cpu", torch.bfloat16, None) is None
    assert bench_training.peak_tflops("cpu", torch.float32, 3.0) == 3.0


def quick_benchmark(script: str, tmp_path) -> dict:
    """The JSON a benchmark script writes from a `--quick` run."""
    import json

    run_python(TINY.parents[1] / "benchmarks" / script, "--quick", "--output", tmp_path / "out.json", timeout=600)
    return json.loads((tmp_path / "out.json").read_text())


def test_the_streaming_benchmark_measures_every_modality_of_the_demo_data_both_ways(tmp_path):
    results = quick_benchmark("bench_streaming.py", tmp_path)
    for modality in ("image", "video", "audio", "imu"):
        measured = results[modality]
        assert measured["streaming_vs_in_memory"] == pytest.approx(
            measured["input"]["streaming_samples_per_s"] / measured["input"]["in_memory_samples_per_s"])
        assert measured["stage1_stream_cache_speedup"] == pytest.approx(
            measured["stage1"]["cached_samples_per_s"] / measured["stage1"]["on_the_fly_samples_per_s"])
        assert min(measured["input"].values()) > 0 and min(measured["stage1"].values()) > 0
    assert results["lowest_streaming_vs_in_memory"] == min(results[m]["streaming_vs_in_memory"] for m in
                                                           ("image", "video", "audio", "imu"))


def test_the_video_decoding_benchmark_compares_the_same_frames_on_every_encoding(tmp_path):
    results = quick_benchmark("bench_video_decode.py", tmp_path)
    # it exits with an error when the readers' frames differ; both rates are measured for every encoding
    assert len(results["results"]) == 4 and all(
        arm["speedup"] == arm["read_sampled_frames_clips_per_second"] / arm["load_video_clips_per_second"] > 0
        for arm in results["results"].values())
    assert results["video_decode_speedup"] == results["results"]["H.264, keyframe every 2 s"]["speedup"]


def test_the_audio_features_benchmark_compares_the_same_features_both_ways(tmp_path):
    results = quick_benchmark("bench_audio_features.py", tmp_path)
    # it exits with an error when the features differ by 1e-4 dB or more; both rates are measured for both settings
    assert len(results["results"]) == 2 and all(
        arm["speedup"] == arm["batched_clips_per_second"] / arm["extractor_clips_per_second"] > 0
        and arm["max_difference_db"] < 1e-4 for arm in results["results"].values())
    assert results["audio_features_speedup"] == results["results"]["rand_trunc (the package's checkpoints)"]["speedup"]


def test_results_md_shows_the_latest_run_as_rendered_from_latest_json(monkeypatch, tmp_path):
    import json

    benchmarks = TINY.parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    import render_results

    latest = json.loads((benchmarks / "latest.json").read_text())
    results_md = (benchmarks / "RESULTS.md").read_text()
    section = results_md.split(render_results.BEGIN, 1)[1].split(render_results.END, 1)[0]
    assert section == "\n" + render_results.render(latest)  # no figure typed by hand, none stale
    assert latest["machine"]["name"] in section and latest["versions"]["transformers"] in section

    # a new run replaces the section and keeps the hand-written notes around it
    copy = tmp_path / "RESULTS.md"
    copy.write_text(results_md)
    latest["date"] = "2099-01-01"
    render_results.write(latest, copy)
    rewritten = copy.read_text()
    assert rewritten.count(render_results.BEGIN) == 1 and "## Latest run: 2099-01-01" in rewritten
    assert rewritten.replace(render_results.render(latest), "") == results_md.replace(section[1:], "")
    # a RESULTS.md without the section gets it after its title
    before, after = results_md.split(render_results.BEGIN)
    copy.write_text(before.rstrip() + after.split(render_results.END)[1])
    render_results.write(json.loads((benchmarks / "latest.json").read_text()), copy)
    assert copy.read_text() == results_md


def test_the_inference_benchmark_refuses_what_the_machine_cannot_hold():
    # three fp32 copies of a 7B language model and two ViT-L towers: about 75 GiB
    with open("/proc/meminfo") as meminfo:
        available = int(next(line for line in meminfo if line.startswith("MemAvailable")).split()[1]) * 1024
    if available > 100 * 2**30:
        pytest.skip("this machine could hold the 7B benchmark's models")
    result = run_python(TINY.parents[1] / "benchmarks" / "bench_inference.py", "--size", "7b", "--quick",
                        check=False, timeout=300)
    assert result.returncode != 0
    assert re.search(r"--size 7b builds AnyMAL, LLaVA and the bare LLM side by side: \d+\.\dB parameters, "
                     r"\d+\.\d GiB in float32 .* Use --size cpu here", result.stderr), result.stderr[-500:]


def test_evaluate_writes_a_report_per_group(tmp_path):
    import json

    from transformers import AutoProcessor

    from anymal_tester import ANSWERS, make_chat_dataset, tiny_model

    tiny_model().save_pretrained(tmp_path / "model")
    AutoProcessor.from_pretrained(TINY).save_pretrained(tmp_path / "model")
    data = make_chat_dataset(tmp_path / "data", rows=8)
    run("eval_anymal.py", "--model_name_or_path", tmp_path / "model", "--dataset_name", data, "--dataset_from_disk",
        "--split", "train", "--output_dir", tmp_path / "eval", "--imu_sampling_rate", "100", "--max_new_tokens", "3",
        "--batch_size", "3", "--group_by", "kind")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["overall"]["count"] == 8 and set(report["by_kind"]) == set(ANSWERS)
    assert all(report["by_kind"][kind]["count"] == 2 for kind in ANSWERS)
    assert {"bleu4", "rouge_l", "cider_d", "vqa_accuracy", "exact_match"} <= set(report["overall"])
    assert sorted(sample["references"][0] for sample in report["samples"]) == sorted(list(ANSWERS.values()) * 2)
