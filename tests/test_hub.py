"""Publishing for real over HTTP: push to a Hub server on 127.0.0.1, then load in fresh processes, with the package
installed and with only transformers (`trust_remote_code=True`)."""

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load as load_file_bytes
from safetensors.torch import load_file

from anymal_tester import TINY
from child_process import run_python
from hub_server import HubServer


REPO = "tester/anymal-tiny"

PUSH = f"""
import sys, torch
sys.path.insert(0, {str(TINY.parents[1] / "tests")!r})
from anymal_tester import tiny_model
from transformers import AutoProcessor
import transformers_anymal

model = tiny_model()
model.save_pretrained(sys.argv[1])  # the local copy the loads are compared with
model.push_to_hub("anymal-tiny", datasets=["digits"], training_stages=["alignment: projectors only"])
AutoProcessor.from_pretrained({str(TINY)!r}).push_to_hub("anymal-tiny")
"""

LOAD = """
import json, sys
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMultimodalLM, AutoProcessor, pipeline

remote = sys.argv[2] == "remote"
if remote:  # only transformers: the code must come from the repo
    sys.modules["transformers_anymal"] = None
    try:
        import transformers_anymal  # noqa: F401
        raise SystemExit("transformers_anymal is importable")
    except ImportError:
        pass
else:
    import transformers_anymal  # noqa: F401
kwargs = {"trust_remote_code": True} if remote else {}

model = AutoModelForMultimodalLM.from_pretrained("tester/anymal-tiny", **kwargs)
processor = AutoProcessor.from_pretrained("tester/anymal-tiny", **kwargs)
local = load_file(sys.argv[1] + "/model.safetensors")
loaded = model.state_dict()
identical = all(torch.equal(loaded[key], tensor) for key, tensor in local.items()) and len(local) == len(loaded)
if remote:  # the pipeline's code comes from the repo too
    pipe = pipeline("any-to-text", model="tester/anymal-tiny", trust_remote_code=True)
else:
    pipe = pipeline("any-to-text", model=model, processor=processor)
chat = [{"role": "user", "content": [
    {"type": "image", "image": np.zeros((20, 20, 3), dtype=np.uint8)},
    {"type": "imu", "imu": np.random.default_rng(0).standard_normal((6, 300)), "sampling_rate": 100},
    {"type": "text", "text": "What is the person doing?"}]}]
[answer] = pipe(chat, max_new_tokens=3, return_full_text=False)
print(json.dumps({"model": type(model).__module__ + "." + type(model).__name__,
                  "processor": type(processor).__module__, "identical": identical,
                  "imu_extractor": type(processor.imu_feature_extractor).__name__,
                  "pipeline": type(pipe).__module__, "answer": answer["generated_text"]}))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer()
    cache = tmp_path_factory.mktemp("hf_home")
    env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_local_test_token",
           "HF_HOME": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    local = tmp_path_factory.mktemp("local-copy")
    run_python("-c", PUSH, local, env=env, timeout=300)
    yield server, env, local
    server.close()


def load(env, local, mode):
    result = run_python("-c", textwrap.dedent(LOAD), local, mode, env=env, timeout=300, cwd=local.parent)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_uploads_weights_code_processor_and_card(hub):
    server, _, _ = hub
    files = server.repos[REPO]
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja",
                 "configuration_anymal.py", "modeling_anymal.py", "processing_anymal.py", "pipeline_anymal.py",
                 "safety_anymal.py", "feature_extraction_anymal.py", "video_processing_anymal.py", "compatibility_anymal.py", "README.md"):
        assert name in files, name
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForMultimodalLM"] == "modeling_anymal.AnyMALForConditionalGeneration"
    assert config["custom_pipelines"]["any-to-text"]["impl"] == "pipeline_anymal.AnyToTextPipeline"
    card = files["README.md"].decode()
    assert "pipeline_tag: any-to-any" in card and "library_name: transformers" in card and "- digits" in card
    assert "| imu | `<imu>` | anymal_imu | linear | 4 |" in card and "alignment: projectors only" in card


def test_loads_with_the_package_installed(hub):
    _, env, local = hub
    loaded = load(env, local, "installed")
    assert loaded["model"] == "transformers_anymal.modeling_anymal.AnyMALForConditionalGeneration"
    assert loaded["identical"] and loaded["imu_extractor"] == "AnyMALIMUFeatureExtractor"


def test_loads_with_trust_remote_code_and_no_package(hub):
    _, env, local = hub
    loaded = load(env, local, "remote")
    assert loaded["model"].startswith("transformers_modules.") and loaded["processor"].startswith("transformers_modules.")
    assert loaded["pipeline"].startswith("transformers_modules.")
    assert loaded["identical"] and loaded["imu_extractor"] == "AnyMALIMUFeatureExtractor"


def test_the_trainers_push_loads_back(hub, tmp_path):
    from transformers import AutoProcessor

    from anymal_tester import make_chat_dataset, tiny_model

    server, env, _ = hub
    tiny_model().save_pretrained(tmp_path / "base")
    AutoProcessor.from_pretrained(TINY).save_pretrained(tmp_path / "base")
    script = TINY.parents[1] / "examples" / "sft.py"
    run_python(script, "--model_name_or_path", tmp_path / "base", "--dataset_name",
               make_chat_dataset(tmp_path / "data"), "--dataset_from_disk", "--imu_sampling_rate", "100", "--output_dir",
               tmp_path / "sft", "--max_steps", "2", "--use_cpu", "--bf16", "false", "--report_to", "none",
               "--push_to_hub", "--hub_model_id", "tester/anymal-sft", env=env)
    assert {"adapter_model.safetensors", "adapter_config.json", "processor_config.json", "README.md"} <= set(
        server.repos["tester/anymal-sft"])
    check = """
import torch, transformers_anymal
from safetensors.torch import load_file
from transformers import AutoModelForMultimodalLM, AutoProcessor
model = AutoModelForMultimodalLM.from_pretrained("tester/anymal-sft")
AutoProcessor.from_pretrained("tester/anymal-sft")
local = load_file(ADAPTER)
state = model.state_dict()
lora = {key.removeprefix("base_model.model.").replace(".weight", ".default.weight"): tensor
        for key, tensor in local.items() if ".lora_" in key}
assert lora and all(torch.equal(state[key], tensor) for key, tensor in lora.items())  # the trained adapters
print("loaded", type(model).__name__)
""".replace("ADAPTER", repr(str(tmp_path / "sft" / "adapter_model.safetensors")))
    loaded = run_python("-c", check, env=env, timeout=300)
    assert "loaded AnyMALForConditionalGeneration" in loaded.stdout


def test_4bit_alignment_pushes_the_full_precision_result(hub, tmp_path):
    from transformers import AutoProcessor

    from anymal_tester import make_chat_dataset, tiny_model

    server, env, _ = hub
    tiny_model().save_pretrained(tmp_path / "base")
    AutoProcessor.from_pretrained(TINY).save_pretrained(tmp_path / "base")
    run_python(TINY.parents[1] / "examples" / "align.py", "--model_name_or_path", tmp_path / "base",
               "--dataset_name", make_chat_dataset(tmp_path / "data"), "--dataset_from_disk", "--imu_sampling_rate",
               "100", "--output_dir", tmp_path / "aligned", "--max_steps", "2", "--load_in_4bit", "--use_cpu", "--bf16",
               "false", "--report_to", "none", "--push_to_hub", "--hub_model_id", "tester/anymal-aligned", env=env)
    files = server.repos["tester/anymal-aligned"]
    assert "model.safetensors" in files and "adapter_config.json" not in files  # PEFT's copies stay local
    pushed = load_file_bytes(files["model.safetensors"])
    local = load_file(str(tmp_path / "aligned" / "model.safetensors"))
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[key], local[key]) for key in local)
    card = files["README.md"].decode()
    assert "alignment: projectors" in card and str(tmp_path) not in card  # a local dataset path is no Hub dataset
