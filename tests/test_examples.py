import subprocess
import sys

from anymal_tester import TINY


EXAMPLES = TINY.parents[1] / "examples"


def run(script, *args):
    return subprocess.run([sys.executable, EXAMPLES / script, *args], capture_output=True, text=True, check=True,
                          cwd=TINY.parents[1], timeout=300)


def test_demo_runs_on_the_tiny_config():
    output = run("demo.py", "--max_new_tokens", "3").stdout
    assert "random ones" in output
    for name, tokens in (("image", 8), ("video", 8), ("audio", 4), ("imu", 4)):
        assert any(line.startswith(name) and line.rstrip().endswith(str(tokens)) for line in output.splitlines())
    assert "generated 3 tokens" in output and "answer:" in output


def test_example_scripts_document_their_options():
    for script in ("demo.py", "convert_imu2clip_checkpoint.py", "cache_features.py"):
        assert "usage:" in run(script, "--help").stdout


def test_benchmarks_document_their_options():
    for script in ("run_all.py", "bench_inference.py", "bench_training.py", "bench_processor.py"):
        result = subprocess.run([sys.executable, TINY.parents[1] / "benchmarks" / script, "--help"], capture_output=True,
                                text=True, check=True, timeout=120)
        assert "--quick" in result.stdout and "--device" in result.stdout
