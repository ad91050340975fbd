"""The main job: `accelerate launch examples/sft.py` with no options learns from the bundled data."""

import json
import subprocess
import sys

from anymal_tester import TINY


EXAMPLES = TINY.parents[1] / "examples"


def test_main_job_learns_from_real_data_and_meets_its_targets(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLES / "sft.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "outputs" / "anymal-demo" / "report.json").read_text())
    kinds = {"image", "video", "audio", "imu", "pair"}
    assert set(report["heldout_accuracy"]) == set(report["ablation_accuracy"]) == set(report["chance"]) == kinds
    for kind in kinds:
        assert report["heldout_accuracy"][kind] >= report["targets"][kind], (kind, report["heldout_accuracy"])
        assert abs(report["ablation_accuracy"][kind] - report["chance"][kind]) <= 0.1, (kind, report["ablation_accuracy"])
    assert report["heldout_count"]["image"] > 300 and report["heldout_count"]["imu"] == 40  # every held-out item
    # the final checkpoint answers through pipeline("any-to-text"), and the run ends with the table
    assert "through pipeline('any-to-text')" in result.stdout and "all targets met" in result.stdout
    assert "held out    accuracy  target  zeroed  chance" in result.stdout
    assert (tmp_path / "outputs" / "anymal-demo" / "instructed" / "merged" / "model.safetensors").exists()
