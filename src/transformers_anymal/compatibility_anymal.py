"""The transformers releases this package supports, and the one difference between them that its code meets.

The difference is detected from transformers' public classes, not from version numbers, so a release that renames
something reaches the model under the name transformers' own models use. Checkpoints carry this file next to the
model's code, so loading them with `trust_remote_code=True` runs the same check.
"""

import warnings
from dataclasses import fields

import transformers
from packaging.version import Version
from transformers.cache_utils import Cache


try:  # transformers >= 5.24: the multimodal outputs, with the cache as `cache` and each encoder's outputs
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as BaseModelOutputWithPast
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as CausalLMOutputWithPast
except ImportError:  # transformers 5.23
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


# The range that `setup.cfg` declares and CI tests at both ends; tests/test_compatibility.py keeps the two equal.
OLDEST_SUPPORTED = "5.23.0"
FIRST_UNSUPPORTED = "5.25.0"
SUPPORTED_RANGE = f">={OLDEST_SUPPORTED},<{FIRST_UNSUPPORTED}"

# transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`: in model outputs, in what
# `generate` passes to `forward`, and in the language models' own `forward`.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def check_transformers_version(installed: str) -> None:
    """Raises `ImportError` for a transformers older than the supported range; warns for a newer one."""
    release = Version(Version(installed).base_version)  # 5.25.0.dev0 is already 5.25
    install = f"pip install 'transformers{SUPPORTED_RANGE}'"
    if release < Version(OLDEST_SUPPORTED):
        raise ImportError(
            f"transformers-anymal needs transformers {SUPPORTED_RANGE}, but {installed} is installed. Run: {install}"
        )
    if release >= Version(FIRST_UNSUPPORTED):
        warnings.warn(
            f"transformers {installed} is newer than the releases transformers-anymal is tested with "
            f"({SUPPORTED_RANGE}). If loading, training or generation fails, run: {install}",
            UserWarning,
            stacklevel=2,
        )


# once per process, on the first import of this package or of a checkpoint's remote code: both import this first
check_transformers_version(transformers.__version__)


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The key/value cache, passed to `forward` as `cache` (transformers >= 5.24) or `past_key_values` (5.23)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the key/value cache once, as `cache` (or `past_key_values`, its name before 5.24).")
    if past_key_values is not None and CACHE_NAME == "cache":  # as transformers' own models say it from 5.24 on
        warnings.warn("`past_key_values` is deprecated for AnyMAL's forward and will be removed with transformers "
                      "5.40, as in transformers' own models. Use `cache` instead.", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


__all__ = [
    "CACHE_NAME",
    "SUPPORTED_RANGE",
    "BaseModelOutputWithPast",
    "CausalLMOutputWithPast",
    "check_transformers_version",
    "resolve_cache_argument",
]
