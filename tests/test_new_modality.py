"""A fifth modality takes one registry entry plus configuration: depth maps through their own ViT."""

import pytest
import torch

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALForConditionalGeneration,
    ModalitySpec,
    register_modality,
)

from anymal_tester import FIRST_SPECIAL_ID, tiny_config


@pytest.fixture
def depth():
    register_modality("depth", ModalitySpec("<depth>", "depth_values", "vit", "perceiver",
                                            ("num_channels", "image_size", "image_size"), num_tokens=4))
    yield
    del MODALITIES["depth"]
    del AnyMALConfig.sub_configs_defaults["depth_config"]


def test_depth_modality_trains_generates_and_round_trips(depth, tmp_path):
    config = AnyMALConfig(**{
        **tiny_config().to_dict(),
        "depth_config": {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 32, "image_size": 16, "patch_size": 4, "num_channels": 1},
        "depth_token_id": FIRST_SPECIAL_ID,  # an unused id stands in for an added <depth> token
    })
    assert config.modalities[-1] == "depth"
    model = AnyMALForConditionalGeneration(config).eval()
    assert type(model.model.encoders["depth"]).__name__ == "ViTModel"

    input_ids = torch.tensor([[FIRST_SPECIAL_ID] * 4 + [10, 11, 12]])
    depth_values = torch.randn(1, 1, 16, 16)
    outputs = model(input_ids=input_ids, depth_values=depth_values, labels=input_ids)
    assert outputs.modality_hidden_states["depth"].shape == (1, 4, config.text_config.hidden_size)
    outputs.loss.backward()
    assert model.model.projectors["depth"].latents.grad is not None

    generated = model.generate(input_ids=input_ids, depth_values=depth_values, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 10)
    with pytest.raises(ValueError, match="depth_values has shape"):
        model(input_ids=input_ids, depth_values=torch.randn(1, 3, 16, 16))

    model.save_pretrained(tmp_path)
    reloaded = AnyMALForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.depth_token_id == FIRST_SPECIAL_ID
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids, depth_values=depth_values).logits,
                           model(input_ids=input_ids, depth_values=depth_values).logits)
