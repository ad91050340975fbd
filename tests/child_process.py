"""Runs a script in a child process for a test; when it fails or hangs, the test's message shows the child's own
error (the end of its stderr and stdout), not just an exit status."""

import shlex
import subprocess
import sys


TAIL = 3000  # characters of each stream shown


def tail(stream: str | bytes | None) -> str:
    if isinstance(stream, bytes):
        stream = stream.decode(errors="replace")
    return (stream or "")[-TAIL:]


def run(command: list, *, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)`; with `check`, a non-zero
    exit fails the test with the child's output."""
    command = [str(part) for part in command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"`{shlex.join(command)}` ran past {timeout:g} s.\n--- stderr (end) ---\n"
                             f"{tail(error.stderr)}\n--- stdout (end) ---\n{tail(error.stdout)}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"`{shlex.join(command)}` exited with {result.returncode}.\n--- stderr (end) ---\n"
                             f"{tail(result.stderr)}\n--- stdout (end) ---\n{tail(result.stdout)}")
    return result


def run_python(*args, **kwargs) -> subprocess.CompletedProcess:
    """`run([python, *args])` with this interpreter."""
    return run([sys.executable, *args], **kwargs)
