import inspect
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from transformers_anymal import MODALITIES, AnyMALConfig, AnyMALForConditionalGeneration, AnyMALIMUConfig

from anymal_tester import TINY, tiny_config


HUB_CONFIGS = sorted(path.parent for path in (TINY.parent).glob("*/config.json"))


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda path: path.name)
def test_every_hub_config_loads_with_auto_config(path: Path):
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, AnyMALConfig)
    assert config.modalities, f"{path.name} enables no modality"


def test_tiny_config_has_all_four_modalities():
    config = tiny_config()
    assert config.modalities == ["image", "video", "audio", "imu"]
    assert config.get_text_config() is config.text_config
    assert isinstance(config.imu_config, AnyMALIMUConfig)
    assert config.get_encoder_config("video") is config.image_config  # frames share the image encoder


def test_json_round_trip(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert AnyMALConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_every_modality_is_wired_where_transformers_reads_it():
    # transformers finds modality inputs by name: a new MODALITIES entry must add each of these
    fields = AnyMALConfig.__dataclass_fields__
    forward_args = inspect.signature(AnyMALForConditionalGeneration.forward).parameters
    for name, spec in MODALITIES.items():
        assert f"{name}_config" in fields, f"AnyMALConfig lacks a {name}_config field"
        assert f"{name}_token_id" in fields, f"AnyMALConfig lacks a {name}_token_id field"
        assert spec.input_name in forward_args, f"forward() lacks a {spec.input_name} argument"
        assert spec.input_modality in AnyMALForConditionalGeneration.input_modalities


def test_strict_types_are_enforced():
    with pytest.raises(StrictDataclassError, match="num_frames"):
        AnyMALConfig(num_frames="8")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_config": {"model_type": "clip_vision_model"}}, "image_token_id is not"),
        ({"audio_token_id": 5}, "needs audio_config"),
        ({"video_token_id": 5}, "needs video_config or image_config"),
        ({"imu_config": {}, "imu_token_id": 10**6}, "outside the language model's vocabulary"),
        ({"imu_config": {}, "imu_token_id": 5, "image_config": {}, "image_token_id": 5}, "both 5"),
        ({"num_tokens": {"smell": 4}}, r"does not know: \[.smell.\].*register_modality\(.smell., ModalitySpec"),
        ({"image_config": {"model_type": "convnext"}, "image_token_id": 5}, r"image encoder \(convnext\) has no integer hidden_size"),
    ],
)
def test_inconsistent_modalities_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnyMALConfig(**kwargs)


def test_imu_window_too_short_for_the_convolutions():
    with pytest.raises(ValueError, match="window_length=50 is too short"):
        AnyMALIMUConfig(window_length=50)


def test_imu2clip_window_gives_imu2clip_gru_width():
    # 5 s at 200 Hz leave 32 pooled steps: the GRU input size of IMU2CLIP's released encoder
    assert AnyMALIMUConfig().pooled_length == 32
