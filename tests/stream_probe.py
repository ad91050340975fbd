"""Runs examples/<recipe> with AnyMALDataCollator recording the WebDataset key and shard of every row it collates,
one line per row in <STREAM_PROBE_DIR>/rank<RANK>.txt, so a test can see which samples each rank read.

    STREAM_PROBE_DIR=keys accelerate launch tests/stream_probe.py align.py --dataset_name shards --streaming ...
"""

import importlib.util
import os
import sys
from pathlib import Path

from transformers_anymal import AnyMALDataCollator


collate = AnyMALDataCollator.__call__


def recording(self, rows):
    with open(Path(os.environ["STREAM_PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as file:
        file.writelines(f"{row['__key__']} {row['__url__']}\n" for row in rows)
    return collate(self, rows)


AnyMALDataCollator.__call__ = recording
recipe = Path(__file__).resolve().parents[1] / "examples" / sys.argv[1]
spec = importlib.util.spec_from_file_location("recipe", recipe)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.cli(sys.argv[2:])
