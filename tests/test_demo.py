"""The main job: `accelerate launch examples/sft.py` with no options learns from the bundled data, says so on one
screen, and leaves a checkpoint that the README's snippets use."""

import json
import os
import re

from anymal_tester import TINY
from child_process import run_python
from readme_snippets import python_snippets


EXAMPLES = TINY.parents[1] / "examples"


def test_main_job_learns_from_real_data_and_meets_its_targets(tmp_path):
    # 25-35 min alone on 2 cores (SmolLM2-135M as the LLM); far longer while other work shares them
    result = run_python("-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", EXAMPLES / "sft.py", cwd=tmp_path,
                        timeout=3000)
    report = json.loads((tmp_path / "outputs" / "anymal-demo" / "report.json").read_text())
    kinds = {"image", "video", "audio", "imu", "pair"}
    assert set(report["heldout_accuracy"]) == set(report["ablation_accuracy"]) == set(report["chance"]) == kinds
    for kind in kinds:
        assert report["heldout_accuracy"][kind] >= report["targets"][kind], (kind, report["heldout_accuracy"])
        zeroed_off_chance = abs(report["ablation_accuracy"][kind] - report["chance"][kind])
        assert zeroed_off_chance <= 0.1 + 1e-9, (kind, report["ablation_accuracy"])
    assert report["heldout_count"]["image"] > 300 and report["heldout_count"]["imu"] == 40  # every held-out item
    # a real pretrained LLM: it still knows what it knew, and stage 1 left its weights bit for bit as they were
    known = [item for item in report["knowledge"] if item["correct_before"]]
    assert len(known) >= 8 and all(item["correct_after"] for item in known), report["knowledge"]
    assert report["knowledge_kept"] and report["language_model_unchanged_by_stage_1"]
    digests = report["language_model_digest"]
    assert re.fullmatch(r"[0-9a-f]{64}", digests["before_stage_1"]) and digests["after_stage_1"] == digests["before_stage_1"]
    assert set(report["step_seconds"]) == {"1/6", "2/6", "3/6", "4/6", "5/6", "6/6"}
    assert f"still right after training: {len(known)} of {len(known)}" in result.stdout
    assert "language model weights, SHA-256 before stage 1" in result.stdout and ": unchanged" in result.stdout
    # the final checkpoint answers through pipeline("any-to-text"), and the run ends with the table
    assert "through pipeline('any-to-text')" in result.stdout and "All targets met" in result.stdout
    assert re.search(r"held out +accuracy +target +zeroed +chance", result.stdout)
    assert (tmp_path / "outputs" / "anymal-demo" / "instructed" / "merged" / "model.safetensors").exists()

    # one screen: steps, results and where things went; the stages' own output is in the log
    lines = result.stdout.strip().splitlines()
    assert len(lines) <= 40, result.stdout
    assert "final checkpoint  outputs/anymal-demo/instructed/merged" in result.stdout
    assert "outputs/anymal-demo/run.log" in result.stdout and "cached data" in result.stdout
    log = (tmp_path / "outputs" / "anymal-demo" / "run.log").read_text()
    assert "accelerate launch examples/align.py --model_name_or_path" in log and '"overall"' in log
    # every core it may run on, although `accelerate launch` without --cpu sets OMP_NUM_THREADS=1
    assert f"torch threads: {len(os.sched_getaffinity(0))}\n" in log
    assert not re.search(r"Warning|WARNING", result.stderr), result.stderr[-3000:]

    # the README's snippets that use the final checkpoint run as written and print answers
    [heldout] = python_snippets('load_from_disk("outputs/anymal-demo/data/heldout")')
    [streaming] = python_snippets("TextIteratorStreamer")
    printed = run_python("-c", heldout + streaming, cwd=tmp_path, timeout=600).stdout.strip().splitlines()
    answers = [re.fullmatch(r"'.+' -> '(.*)' \(reference '(.*)'\)", line) for line in printed[:5]]
    assert all(answers), printed
    assert sum(answer == reference for answer, reference in (match.groups() for match in answers)) >= 4, printed
    assert printed[5].strip() == answers[4].group(1)  # streamed, the same answer as the pipeline's

