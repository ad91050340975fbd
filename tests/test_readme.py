"""The README's snippets run as written (those that need the main job's checkpoint run in tests/test_demo.py)."""

import pytest

from child_process import run_python
from readme_snippets import README, python_snippets


def test_the_opening_snippet_runs_on_random_weights():
    [snippet] = python_snippets('"video": rng.integers(')
    result = run_python("-c", snippet, cwd=README.parent, timeout=300)
    assert result.stdout.strip(), result.stderr  # random weights: some text, nothing meaningful
    assert "longer than" not in result.stderr  # the example's media fit their encoders' windows as they are


def test_the_safety_snippet_refuses_the_offensive_chat_only():
    pytest.importorskip("profanity_check", reason="needs the [safety] extra")
    [snippet] = python_snippets("AnyMALSafetyChecker.offline(")
    result = run_python("-c", snippet, cwd=README.parent, timeout=300)
    first, second = result.stdout.strip().splitlines()
    assert first.endswith("| None")
    assert second == '"I can\'t help with that request." | the input text check flagged this (offensive) with score 1.00'
