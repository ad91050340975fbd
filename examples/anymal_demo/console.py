"""Where the main job's output goes: stage headers, progress bars and results on the terminal; the rest (the stages'
own printing, library logs and warnings) into a log file, or on the terminal too with `--verbose`."""

import contextlib
import logging
import sys
import warnings
from pathlib import Path


_terminal = None  # inside `log_to`: the stdout it redirected, where `say` still writes


@contextlib.contextmanager
def log_to(path: Path, verbose: bool = False):
    """Within the block, `print` and every library's logging and warnings go to `path`, unless `verbose`.

    Progress bars (tqdm, on stderr) stay on the terminal; `say()` writes to it too."""
    if verbose:
        yield
        return
    global _terminal
    path.parent.mkdir(parents=True, exist_ok=True)
    _terminal = sys.stdout
    with open(path, "w") as log, contextlib.redirect_stdout(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        # libraries that log to stderr through handlers of their own (transformers, datasets) log to the file
        replaced = {}
        for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
            if logger.handlers or logger is logging.root:
                replaced[logger] = logger.handlers[:]
                logger.handlers = [handler]
        logging.captureWarnings(True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # each distinct warning once, in the log
                yield
        finally:
            _terminal = None
            logging.captureWarnings(False)
            for logger, handlers in replaced.items():
                logger.handlers = handlers


def say(text: str = "") -> None:
    """A line on the terminal, also when `print` goes to the log."""
    print(text, file=_terminal or sys.stdout, flush=True)


def disk_usage(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.0f} MB"
