"""The paper's configurations: built on the meta device, each component has its published parameter count."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForMultimodalLM

from anymal_tester import TINY


PUBLISHED = {  # parameters of the published checkpoints' modules that AnyMAL reuses
    "Llama-2-7b-chat-hf": 6_738_415_616,
    "Llama-2-13b-chat-hf": 13_015_864_320,
    "Llama-2-70b-chat-hf": 68_976_648_192,
    "clip-vit-large-patch14 vision tower": 303_179_776,
    "CLIP-ViT-bigG-14 vision tower": 1_844_910_000 - 1664 * 1280,  # OpenCLIP's image tower less its projection
}
EXPECTED = {
    "anymal-7b": ("Llama-2-7b-chat-hf", "clip-vit-large-patch14 vision tower"),
    "anymal-13b": ("Llama-2-13b-chat-hf", "clip-vit-large-patch14 vision tower"),
    "anymal-70b": ("Llama-2-70b-chat-hf", "CLIP-ViT-bigG-14 vision tower"),
}


def count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_counts_match_the_published_components(name):
    config = AutoConfig.from_pretrained(TINY.parent / name)
    with torch.device("meta"):
        model = AutoModelForMultimodalLM.from_config(config)
    llm, vision = EXPECTED[name]
    counts = {
        llm: count(model.model.language_model) + count(model.lm_head),
        vision: count(model.model.encoders["image"]),
        "CLAP HTSAT audio tower": count(model.model.encoders["audio"]),
        "IMU encoder": count(model.model.encoders["imu"]),
        "projectors": count(model.model.projectors),
    }
    print(name, {part: f"{value / 1e6:,.1f}M" for part, value in counts.items()}, f"total {count(model) / 1e9:.2f}B")
    for part in (llm, vision):
        assert counts[part] == pytest.approx(PUBLISHED[part], rel=0.01), part
    assert config.modalities == ["image", "video", "audio", "imu"]
    assert "video" not in model.model.encoders  # frames share the image tower
    assert counts["projectors"] < 0.05 * counts[llm]  # the small part that alignment trains


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_device_maps_of_anymal_70b_never_split_a_layer(gpus):
    from accelerate import infer_auto_device_map

    with torch.device("meta"):
        model = AutoModelForMultimodalLM.from_config(AutoConfig.from_pretrained(TINY.parent / "anymal-70b"),
                                                     dtype=torch.bfloat16)
    no_split = model._no_split_modules
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer", "ClapAudioLayer", "AnyMALIMUEncoder", "AnyMALPerceiverLayer",
            "AnyMALLinearProjector"} <= no_split
    device_map = infer_auto_device_map(model, max_memory={**{gpu: "80GiB" for gpu in range(gpus)}, "cpu": "1000GiB"},
                                       no_split_module_classes=list(no_split))
    assert set(device_map.values()) <= set(range(gpus)), device_map  # 140 GB of bf16 weights fit on 2 x 80 GB

    def device_of(parameter_name: str):
        prefixes = [key for key in device_map if key == "" or parameter_name == key or parameter_name.startswith(key + ".")]
        return device_map[max(prefixes, key=len)]

    for name, module in model.named_modules():
        if type(module).__name__ in no_split:
            devices = {device_of(f"{name}.{parameter}") for parameter, _ in module.named_parameters()}
            assert len(devices) == 1, f"{name} ({type(module).__name__}) is split over {devices}"
