"""Runs a script in a child process for a test; when it fails or hangs, the test's message shows the child's own
error (the end of its stderr and stdout), not just an exit status."""

import os
import shlex
import signal
import subprocess
import sys


TAIL = 3000  # characters of each stream shown


def tail(stream: str | bytes | None) -> str:
    if isinstance(stream, bytes):
        stream = stream.decode(errors="replace")
    return (stream or "")[-TAIL:]


def run(command: list, *, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)`, with the child in a
    process group of its own that a timeout kills whole; with `check`, a non-zero exit fails the test with the
    child's output."""
    command = [str(part) for part in command]
    # its own process group, so that a timeout ends the workers a launcher (torchrun, accelerate) started too
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"`{shlex.join(command)}` ran past {timeout:g} s.\n--- stderr (end) ---\n"
                             f"{tail(stderr)}\n--- stdout (end) ---\n{tail(stdout)}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"`{shlex.join(command)}` exited with {result.returncode}.\n--- stderr (end) ---\n"
                             f"{tail(result.stderr)}\n--- stdout (end) ---\n{tail(result.stdout)}")
    return result


def run_python(*args, **kwargs) -> subprocess.CompletedProcess:
    """`run([python, *args])` with this interpreter."""
    return run([sys.executable, *args], **kwargs)


def kill_once_written(command: list, path, *, timeout: float = 300, **kwargs) -> None:
    """Runs `command` (in a process group of its own) until the file `path` exists, then kills it with SIGKILL, as a
    crash or a preempted machine would; fails the test when the command ends first."""
    import time

    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, **kwargs)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None and time.time() < deadline, f"the command ended before writing {path}"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
