import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForMultimodalLM, BitsAndBytesConfig

from anymal_tester import make_inputs, tiny_model


QUANTIZED = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
CONFIGS = {
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("anymal-tiny")
    tiny_model().save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_only_the_language_model_is_quantized(checkpoint, bits):
    model = AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=CONFIGS[bits])
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    quantized = {name for name, module in linears.items() if isinstance(module, QUANTIZED[bits])}
    assert quantized, "no layer was quantized"
    assert all(name.startswith("model.language_model.") for name in quantized)
    kept = {name for name in linears if name.startswith(("model.encoders.", "model.projectors.", "lm_head"))}
    assert kept and not kept & quantized
    assert len(quantized) == sum(name.startswith("model.language_model.") for name in linears)

    inputs = make_inputs(model.config, [["image", "video", "audio", "imu", "text"]])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_user_skip_list_is_extended_not_replaced(checkpoint):
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["down_proj"],
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=config)
    assert not isinstance(model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.model.projectors["image"].proj, bnb.nn.Linear4bit)
    assert config.llm_int8_skip_modules == ["down_proj"]  # the caller's config is left as it was


def test_4bit_model_saves_and_reloads(checkpoint, tmp_path):
    model = AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=CONFIGS["4bit"])
    inputs = make_inputs(model.config, [["image", "imu", "text"]])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMultimodalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(reloaded.model.projectors["image"].proj, bnb.nn.Linear4bit)
    for key, tensor in model.state_dict().items():  # quantized weights and their quant state come back bit-exact
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("config_class", ["QuantoConfig", "FbgemmFp8Config", "EetqConfig", "HiggsConfig"])
def test_other_quantizers_are_told_to_leave_encoders_and_projectors_alone(config_class, checkpoint):
    """Their backends need GPUs or packages this machine lacks, so the test stops where transformers takes over and
    asks transformers' own matcher which layers the handed-over config quantizes."""
    from unittest import mock

    import transformers
    from transformers import PreTrainedModel
    from transformers.quantizers.quantizers_utils import should_convert_module

    users_config = getattr(transformers, config_class)(modules_to_not_convert=["model.language_model.layers.0.mlp"])
    handed = {}
    with mock.patch.object(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: handed.update(k))):
        AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=users_config)
    skipped = handed["quantization_config"].modules_to_not_convert
    assert users_config.modules_to_not_convert == ["model.language_model.layers.0.mlp"]  # the user's object untouched
    for name, module in tiny_model().named_modules():
        if isinstance(module, nn.Linear):
            expected = name.startswith("model.language_model.") and ".layers.0.mlp." not in name
            assert should_convert_module(name, skipped) == expected, name


def test_a_quantizer_that_cannot_skip_modules_is_refused(checkpoint):
    from transformers import GPTQConfig

    with pytest.raises(ValueError, match="GPTQConfig cannot leave modules unquantized, so it would quantize AnyMAL's "
                                         "encoders and projectors too"):
        AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=GPTQConfig(bits=4))


def test_projector_tuning_changes_no_global_warning_filter_and_wraps_projectors_quietly(checkpoint):
    import warnings

    from transformers_anymal.training_anymal import peft_model, projector_tuning_config

    model = AutoModelForMultimodalLM.from_pretrained(checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    filters = list(warnings.filters)
    config = projector_tuning_config(model)
    assert warnings.filters == filters  # a helper that builds a config leaves the process's warning filters alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = peft_model(model, config)
    assert not [warning for warning in caught if "Unsupported layer type" in str(warning.message)]
    assert warnings.filters == filters
    trainable = {name.split(".modules_to_save")[0] for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".projectors." in name for name in trainable)
