"""The README's snippets run as written (those that need the main job's checkpoint run in tests/test_demo.py)."""

from child_process import run_python
from readme_snippets import README, python_snippets


def test_the_opening_snippet_runs_on_random_weights():
    [snippet] = python_snippets('AutoConfig.from_pretrained("hub_configs/anymal-tiny")')
    result = run_python("-c", snippet, cwd=README.parent, timeout=300)
    assert result.stdout.strip(), result.stderr  # random weights: some text, nothing meaningful
    assert "longer than" not in result.stderr  # the example's media fit their encoders' windows as they are
