"""Inference needs only what `pip install transformers-anymal` brings: the training packages of the `train` extra
are hidden from a child interpreter, which then runs the processor, the model, generation and the pipeline."""

import site
import sys
from pathlib import Path

from child_process import run


TRAINING_ONLY = ("trl", "peft", "bitsandbytes", "datasets", "accelerate")  # setup.cfg's `train` extra

INFERENCE = """
import importlib.util
import numpy as np
from transformers import AutoProcessor, pipeline
import transformers_anymal
from anymal_tester import TINY, tiny_model

hidden = [name for name in {hidden!r} if importlib.util.find_spec(name) is not None]
assert not hidden, hidden
processor, model = AutoProcessor.from_pretrained(TINY), tiny_model()
chat = [{{"role": "user", "content": [
    {{"type": "image", "image": np.zeros((40, 50, 3), np.uint8)}},
    {{"type": "imu", "imu": np.random.default_rng(0).standard_normal((6, 300)), "sampling_rate": 100}},
    {{"type": "text", "text": "What is going on?"}}]}}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
answer = pipeline("any-to-text", model=model, processor=processor)(chat, max_new_tokens=3, do_sample=False)
assert generated.shape[1] == inputs["input_ids"].shape[1] + 3 and answer
print("INFERENCE OK")
"""


def lean_site_packages(folder: Path) -> Path:
    """The installed packages as links in `folder`, minus the training-only ones (modules and their metadata)."""
    folder.mkdir()
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            name = entry.name.lower().replace("-", "_")
            if not any(name == hidden or name.startswith(f"{hidden}-") or name.startswith(f"{hidden}.")
                       or name.startswith(f"{hidden}_") for hidden in TRAINING_ONLY):
                if not (folder / entry.name).exists():
                    (folder / entry.name).symlink_to(entry)
    return folder


def test_inference_runs_without_the_training_packages(tmp_path):
    lean = lean_site_packages(tmp_path / "site-packages")
    repository = Path(__file__).resolve().parents[1]
    path = f"{lean}:{repository / 'src'}:{repository / 'tests'}"
    script = tmp_path / "inference.py"
    script.write_text(INFERENCE.format(hidden=TRAINING_ONLY))
    # -S: without the real site-packages (and the editable install's hooks); only the lean copy is on the path
    result = run([sys.executable, "-S", script], env={"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
                 timeout=300)
    assert "INFERENCE OK" in result.stdout
