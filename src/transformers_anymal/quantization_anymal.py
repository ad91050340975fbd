"""Quantization policy: only the language model is quantized; encoders, projectors and `lm_head` stay as loaded."""

import copy

from transformers import BitsAndBytesConfig
from transformers.quantizers import AutoQuantizationConfig


# modules any `quantization_config` given to AnyMAL's from_pretrained leaves alone, as transformers' regexes
MODULES_NOT_TO_QUANTIZE = [r"(model\.)?encoders", r"(model\.)?projectors", "lm_head"]


def skip_in_quantization(quantization_config, patterns: list[str]):
    """A copy of `quantization_config` that also leaves the modules matching `patterns` unquantized: its
    `llm_int8_skip_modules` (bitsandbytes) or `modules_to_not_convert` (the other quantizers) extended."""
    if isinstance(quantization_config, dict):
        quantization_config = AutoQuantizationConfig.from_dict(quantization_config)
    field = "llm_int8_skip_modules" if isinstance(quantization_config, BitsAndBytesConfig) else "modules_to_not_convert"
    if not hasattr(quantization_config, field):
        raise ValueError(
            f"{type(quantization_config).__name__} cannot leave modules unquantized, so it would quantize AnyMAL's "
            "encoders and projectors too; quantize the language model with BitsAndBytesConfig(load_in_4bit=True) "
            "(or 8-bit), or another config that has `modules_to_not_convert`."
        )
    quantization_config = copy.deepcopy(quantization_config)
    setattr(quantization_config, field, list(dict.fromkeys((getattr(quantization_config, field) or []) + patterns)))
    return quantization_config


class AnyMALQuantizationMixin:
    """`from_pretrained` with a `quantization_config` that quantizes the language model only."""

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """As [`PreTrainedModel.from_pretrained`]; a `quantization_config` quantizes only the language model, and an
        `attn_implementation` string applies to each sub-model that supports it (the others use "eager")."""
        if quantization_config is not None:
            quantization_config = skip_in_quantization(quantization_config, MODULES_NOT_TO_QUANTIZE)
        return super().from_pretrained(*args, quantization_config=quantization_config, **kwargs)
