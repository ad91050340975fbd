"""What transformers promises of every model it ships, checked on AnyMAL the way its common tests check them
(`tests/test_modeling_common.py`, `tests/generation/test_utils.py` of a transformers source distribution)."""

import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate import infer_auto_device_map
from safetensors import safe_open

from transformers_anymal import AnyMALConfig, AnyMALForConditionalGeneration, AnyMALIMUEncoder, modeling_anymal

from anymal_tester import make_inputs, tiny_config, tiny_model
from child_process import run


ALL = ["text", "image", "text", "video", "audio", "imu", "text"]
PADDED_BATCH = [ALL, ["text", "image"]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


# Sub-model declarations: post_init gathers them from direct children; AnyMAL's encoders sit in a ModuleDict


def test_every_encoders_no_split_modules_are_gathered():
    model = tiny_model()
    for name, encoder in model.model.encoders.items():
        assert set(encoder._no_split_modules) <= model._no_split_modules, name
    assert {"CLIPEncoderLayer", "LlamaDecoderLayer", "AnyMALPerceiverLayer", "ClapAudioLayer"} <= model._no_split_modules


def test_device_map_never_splits_an_encoder_layer():
    model = tiny_model()
    no_split = tuple(model._no_split_modules)
    unsplittable = {name for name, module in model.named_modules() if type(module).__name__ in no_split}
    sizes = sorted({sum(p.numel() * p.element_size() for p in module.parameters()) for module in model.modules()})
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for budget in range(sizes[-1] // 20, total, total // 40):  # first device's budget, cutting at many places
        device_map = infer_auto_device_map(model, max_memory={0: budget, 1: total}, no_split_module_classes=no_split)
        inside = [key for key in device_map for unit in unsplittable if key.startswith(unit + ".")]
        assert not inside, f"budget {budget}: {inside[:3]} split a no-split module"


@pytest.mark.parametrize(
    "attribute, value, dtype",
    [("_keep_in_fp32_modules", ["gru"], torch.float16),  # upcast in fp16 checkpoints only
     ("_keep_in_fp32_modules_strict", ["gru"], torch.bfloat16),
     ("_keys_to_ignore_on_save", ["output_norm.bias"], torch.float32)],
)
def test_an_encoders_declarations_take_effect_in_the_whole_model(tmp_path, attribute, value, dtype):
    with mock.patch.object(AnyMALIMUEncoder, attribute, value):
        model = tiny_model()
        model.save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", "pt") as weights:
            saved = set(weights.keys())
        reloaded = AnyMALForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    imu = reloaded.model.encoders["imu"]
    if attribute.startswith("_keep_in_fp32"):
        assert imu.gru.weight_hh_l0.dtype == torch.float32
        assert imu.output_norm.weight.dtype == dtype
    else:
        assert "model.encoders.imu.output_norm.bias" not in saved
        assert "model.encoders.imu.output_norm.weight" in saved


# Attention backends asked for by name


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_an_attention_backend_by_name_reaches_every_sub_model_that_supports_it(checkpoint, implementation):
    inputs = make_inputs(tiny_config(), PADDED_BATCH)
    real = inputs["attention_mask"].bool()
    with mock.patch.object(modeling_anymal.logger, "warning_once") as warning:
        model = AnyMALForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=implementation)
    warning.assert_called_once()
    assert "audio_config (ClapAudioModel)" in warning.call_args.args[0]
    backends = {name: encoder.config._attn_implementation for name, encoder in model.model.encoders.items()}
    assert backends == {"image": implementation, "audio": "eager", "imu": implementation}
    assert model.model.language_model.config._attn_implementation == implementation
    eager = AnyMALForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], eager(**inputs).logits[real], atol=1e-5, rtol=1e-5)


def test_set_attn_implementation_by_name_falls_back_where_unsupported():
    model = tiny_model(tiny_config(attn_implementation="eager"))
    model.set_attn_implementation("sdpa")
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert model.model.encoders["image"].config._attn_implementation == "sdpa"
    assert model.model.encoders["audio"].config._attn_implementation == "eager"


def test_flash_attention_is_asked_of_the_sub_models_that_have_it():
    implementations = modeling_anymal.attention_per_sub_model(tiny_config(), "flash_attention_2")
    assert implementations == {"text_config": "flash_attention_2", "image_config": "flash_attention_2",
                               "audio_config": "eager", "imu_config": "flash_attention_2"}


def test_a_model_built_without_asking_warns_of_nothing():
    with mock.patch.object(modeling_anymal.logger, "warning_once") as warning:
        tiny_model()
    warning.assert_not_called()


# Outputs


def test_attentions_and_hidden_states_flow_as_in_llava():
    config = tiny_config(attn_implementation="eager")
    model = tiny_model(config)
    inputs = make_inputs(config, PADDED_BATCH)
    length, layers = inputs["input_ids"].shape[1], config.text_config.num_hidden_layers
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
        base = model.model(**inputs)
    assert len(outputs.attentions) == layers
    assert outputs.attentions[0].shape == (2, config.text_config.num_attention_heads, length, length)
    assert len(outputs.hidden_states) == layers + 1
    torch.testing.assert_close(outputs.hidden_states[-1], base.last_hidden_state)

    config.output_attentions = config.text_config.output_attentions = True  # the config's flags, as the common tests set them
    with torch.no_grad():
        assert len(tiny_model(config)(**inputs).attentions) == layers


def test_return_dict_false_gives_the_outputs_as_a_tuple():
    model = tiny_model()
    inputs = make_inputs(model.config, PADDED_BATCH)
    with torch.no_grad():
        as_dict = model(**inputs, labels=inputs["input_ids"])
        as_tuple = model(**inputs, labels=inputs["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple())
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


# Any decoder as the language model


def test_a_decoder_that_names_its_embeddings_otherwise_ties_and_generates(tmp_path):
    config = AnyMALConfig(**{**tiny_config().to_dict(), "text_config": {  # GPT-2: `wte`, tied by default
        "model_type": "gpt2", "vocab_size": 388, "n_embd": 32, "n_layer": 1, "n_head": 2,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}})
    model = AnyMALForConditionalGeneration(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    inputs = make_inputs(config, [ALL])
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    reloaded = AnyMALForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=3, do_sample=False), generated)


# Tensor parallelism

TENSOR_PARALLEL = """
import sys
import torch
from transformers import DistributedConfig
from transformers_anymal import AnyMALForConditionalGeneration
from anymal_tester import make_inputs

sharded = AnyMALForConditionalGeneration.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(tp_plan="auto"))
whole = AnyMALForConditionalGeneration.from_pretrained(sys.argv[1])
inputs = make_inputs(whole.config, [["text", "image", "text"], ["text", "imu", "audio"]])
with torch.no_grad():
    difference = (sharded(**inputs).logits - whole(**inputs).logits).abs().max().item()
rows = sharded.lm_head.weight.to_local().shape[0]
print(f"RESULT tp_size={sharded.tp_size} lm_head_rows={rows} vocab={whole.config.text_config.vocab_size} "
      f"difference={difference}")
"""


def test_tensor_parallel_loading_shards_the_language_model_and_gives_the_same_logits(checkpoint, tmp_path):
    script = tmp_path / "tensor_parallel.py"
    script.write_text(TENSOR_PARALLEL)
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  script, checkpoint], timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    # the two ranks share one stdout, where their lines can run together: read each rank's fields by pattern
    ranks = re.findall(r"RESULT tp_size=(\d+) lm_head_rows=(\d+) vocab=(\d+) difference=([0-9.]+(?:e-?\d+)?)",
                       result.stdout)
    assert len(ranks) == 2, result.stdout
    for fields in ranks:
        values = dict(zip(("tp_size", "lm_head_rows", "vocab", "difference"), fields))
        assert values["tp_size"] == "2"
        assert int(values["lm_head_rows"]) * 2 == int(values["vocab"])
        assert float(values["difference"]) < 1e-5
