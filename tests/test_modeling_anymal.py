from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    ClapAudioModel,
    CLIPVisionModel,
)

from transformers_anymal import (
    AnyMALConfig,
    AnyMALForConditionalGeneration,
    AnyMALIMUEncoder,
    AnyMALLinearProjector,
    AnyMALModel,
    AnyMALPerceiverResampler,
)

from anymal_tester import TINY, make_inputs, tiny_config, tiny_model
from child_process import run_python


ALL = ["text", "image", "text", "video", "audio", "imu", "text"]


def language_model_inputs(model, inputs) -> torch.Tensor:
    """The `inputs_embeds` the language model receives for `inputs`."""
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return captured["inputs_embeds"]


def test_auto_classes_resolve_after_import():
    config = AutoConfig.from_pretrained(TINY)
    assert type(config) is AnyMALConfig
    assert type(AutoModel.from_config(config)) is AnyMALModel  # the base model, no LM head
    assert type(AutoModelForImageTextToText.from_config(config)) is AnyMALForConditionalGeneration
    assert type(AutoModelForMultimodalLM.from_config(config)) is AnyMALForConditionalGeneration


def test_architecture_is_the_papers():
    model = tiny_model()
    encoders, projectors = model.model.encoders, model.model.projectors
    assert isinstance(encoders["image"], CLIPVisionModel)
    assert isinstance(encoders["audio"], ClapAudioModel)
    assert isinstance(encoders["imu"], AnyMALIMUEncoder)
    assert "video" not in encoders and model.model.modality_encoder("video") is encoders["image"]
    assert isinstance(projectors["image"], AnyMALPerceiverResampler)
    assert isinstance(projectors["video"], AnyMALPerceiverResampler)
    assert projectors["video"].frame_embeddings.shape[0] == model.config.num_frames
    assert isinstance(projectors["audio"], AnyMALLinearProjector)
    assert isinstance(projectors["imu"], AnyMALLinearProjector)
    config, text_hidden = model.config, model.config.text_config.hidden_size
    for name in ("image", "video"):  # Perceiver Resamplers: num_tokens latents in the encoder's width, then projected
        encoder_hidden = config.get_encoder_config(name).hidden_size
        assert projectors[name].latents.shape == (config.num_tokens[name], encoder_hidden)
        assert len(projectors[name].layers) == config.resampler_depth
        assert (projectors[name].proj.in_features, projectors[name].proj.out_features) == (encoder_hidden, text_hidden)
    for name in ("audio", "imu"):  # linear: one pooled embedding to num_tokens LLM tokens
        assert projectors[name].proj.out_features == config.num_tokens[name] * text_hidden
    inputs = make_inputs(config, [ALL])
    with torch.no_grad():
        tokens = model(**inputs).modality_hidden_states
    assert {name: tuple(t.shape) for name, t in tokens.items()} == {
        name: (1, config.num_tokens[name], text_hidden) for name in config.modalities}


def test_separate_video_encoder_is_built_from_video_config():
    config = tiny_config()
    config.video_config = AutoConfig.for_model("vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, image_size=32, patch_size=8)
    model = AnyMALForConditionalGeneration(AnyMALConfig(**config.to_dict())).eval()
    assert type(model.model.encoders["video"]).__name__ == "ViTModel"
    inputs = make_inputs(model.config, [["video", "text"]])
    assert model(**inputs).modality_hidden_states["video"].shape == (1, 8, 64)


def test_each_item_fills_its_own_placeholder_run():
    model = tiny_model()
    inputs = make_inputs(model.config, [["image", "text", "image", "audio"], ["text", "image", "imu"]])
    embeds = language_model_inputs(model, inputs)
    with torch.no_grad():
        images = model.get_modality_features("image", inputs["pixel_values"])  # (3 items, 8 tokens, hidden)
        audio = model.get_modality_features("audio", inputs["input_features"])
    image_positions = inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(embeds[0][image_positions[0]], images[:2].flatten(0, 1))
    assert torch.equal(embeds[1][image_positions[1]], images[2])
    assert torch.equal(embeds[0][inputs["input_ids"][0] == model.config.audio_token_id], audio[0])
    text = ~(inputs["input_ids"] >= model.config.image_token_id)
    assert torch.equal(embeds[text], model.get_input_embeddings()(inputs["input_ids"])[text])


def test_modality_input_changes_only_later_positions_of_its_sample():
    model = tiny_model()
    inputs = make_inputs(model.config, [["text", "imu", "text"], ["text", "imu", "text"]])
    logits = model(**inputs).logits
    changed = dict(inputs, imu_values=inputs["imu_values"].clone())
    # another recording, not an offset or a scale of the same one: the encoder's input GroupNorm cancels those
    changed["imu_values"][0] = torch.randn(changed["imu_values"][0].shape, generator=torch.Generator().manual_seed(1))
    new_logits = model(**changed).logits
    first_imu = int((inputs["input_ids"][0] == model.config.imu_token_id).nonzero()[0])
    assert torch.equal(new_logits[0, :first_imu], logits[0, :first_imu])  # causal: earlier text unaffected
    assert (new_logits[0, -1] - logits[0, -1]).abs().max() > 1e-3  # far beyond rounding noise
    assert torch.equal(new_logits[1], logits[1])  # the other sample keeps its own recording


def test_precomputed_encoder_features_match_on_the_fly():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL, ["image", "text", "audio"]])
    names = {"pixel_values": "image", "pixel_values_videos": "video", "input_features": "audio", "imu_values": "imu"}
    with torch.no_grad():
        cached = {name: model.model.get_encoder_features(name, inputs.pop(key)) for key, name in names.items()}
    text_only = dict(inputs)
    on_the_fly = make_inputs(model.config, [ALL, ["image", "text", "audio"]])
    assert torch.allclose(model(**text_only, encoder_features=cached).logits, model(**on_the_fly).logits, atol=1e-6)
    generated = model.generate(**text_only, encoder_features=cached, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, model.generate(**on_the_fly, max_new_tokens=6, do_sample=False))


def test_projector_gets_gradients_from_cached_features():
    model = tiny_model()
    model.set_trainable()  # alignment stage: projectors only
    inputs = make_inputs(model.config, [["image", "text"]])
    cached = {"image": model.model.get_encoder_features("image", inputs.pop("pixel_values")).detach()}
    model(**inputs, encoder_features=cached, labels=inputs["input_ids"]).loss.backward()
    assert model.model.projectors["image"].latents.grad is not None


def test_save_and_load_reproduces_logits_through_safetensors(tmp_path):
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForMultimodalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_new_projector_weights_are_initialised_when_missing_from_the_checkpoint(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".projectors." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    reloaded = AnyMALForConditionalGeneration.from_pretrained(tmp_path)
    for name, parameter in reloaded.model.projectors.named_parameters():
        assert torch.isfinite(parameter).all(), name
    assert 0.5 < reloaded.model.projectors["image"].latents.std() < 2.0
    logits = reloaded(**make_inputs(reloaded.config, [ALL])).logits
    assert torch.isfinite(logits).all()


def test_set_trainable_freezes_by_part():
    model = tiny_model()
    counts = model.set_trainable(language_model=False, encoders=False, projectors=True)
    assert counts["language_model"] == 0 and counts["encoders.image"] == 0 and counts["projectors.imu"] > 0
    inputs = make_inputs(model.config, [ALL])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, parameter in model.named_parameters():
        has_grad = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert has_grad == (".projectors." in name), name

    model.train()  # frozen encoders stay in eval mode: CLAP's BatchNorm statistics must not drift
    assert not any(encoder.training for encoder in model.model.encoders.values())
    assert model.model.projectors["image"].training and model.model.language_model.training

    counts = model.set_trainable(language_model=True, encoders=["imu"], projectors=["audio"])
    assert counts["language_model"] > 0 and counts["encoders.imu"] > 0 and counts["encoders.image"] == 0
    assert counts["projectors.audio"] > 0 and counts["projectors.image"] == 0
    with pytest.raises(ValueError, match="no modality"):
        model.set_trainable(encoders=["smell"])


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    inputs = make_inputs(tiny_config(), [ALL])
    gradients = {}
    for checkpointing in (False, True):
        model = tiny_model().train()  # the same weights both times
        if checkpointing:
            model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing == checkpointing
        layers = model.model.language_model.layers
        mlp = type(layers[0].mlp)  # counted at the class, where the replay during backward shows too
        with mock.patch.object(mlp, "forward", autospec=True, side_effect=mlp.forward) as mlp_forward:
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert mlp_forward.call_count == len(layers) * (2 if checkpointing else 1)  # checkpointed layers run again
        gradients[checkpointing] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert gradients[True].keys() == gradients[False].keys() and gradients[True]
    for name, gradient in gradients[False].items():
        assert torch.allclose(gradients[True][name], gradient, atol=1e-6), name


def test_other_decoder_families_work_as_the_language_model():
    for text_config in (
        {"model_type": "qwen2", "vocab_size": 388, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2},
        {"model_type": "mistral", "vocab_size": 388, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
    ):
        config = AnyMALConfig(**{**tiny_config().to_dict(), "text_config": text_config})
        model = AnyMALForConditionalGeneration(config).eval()
        inputs = make_inputs(config, [ALL])
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_lm_head_ties_to_the_embeddings_when_the_text_config_asks(tmp_path):
    config = tiny_config()
    config = AnyMALConfig(**{**config.to_dict(), "text_config": {**config.text_config.to_dict(), "tie_word_embeddings": True}})
    model = AnyMALForConditionalGeneration(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    reloaded = AnyMALForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    untied = tiny_model()
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


# Bad input: a clear error naming the input, never a shape error from inside torch


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.pop("pixel_values"), "placeholder tokens but no image input"),
        (lambda i: i.update(pixel_values=torch.cat([i["pixel_values"]] * 2)), r"image: the text has 8 <image> placeholder tokens \(1 items x 8\) but 2 image items"),
        (lambda i: i.update(pixel_values=torch.randn(1, 3, 64, 64)), r"pixel_values has shape \(1, 3, 64, 64\)"),
        (lambda i: i.update(imu_values=torch.randn(1, 3, 1000)), r"num_channels=6"),
        (lambda i: i["imu_values"].__setitem__((0, 2, 10), float("nan")), r"NaN or infinite values in imu item\(s\) \[0\]"),
        (lambda i: i.update(pixel_values_videos=torch.randn(1, 9, 3, 32, 32)), "9 frames per item"),
        (lambda i: i.update(imu_values=[[0.0] * 1000] * 6), "imu_values must be a torch.Tensor"),
        (lambda i: i.update(input_ids=i["input_ids"][:, :0], attention_mask=i["attention_mask"][:, :0]),
         "The input has no tokens"),
        (lambda i: i.update(imu_values=torch.randn(0, 6, 1000)), "imu_values holds no imu items"),
        (lambda i: i.update(encoder_features={"imu": torch.randn(1, 7)}, imu_values=None),
         r"encoder_features\['imu'\] has shape \(1, 7\) but this model's imu projector takes \(items, \d+\)"),
        (lambda i: i.update(encoder_features={"image": torch.randn(1, 32)}, pixel_values=None),
         r"encoder_features\['image'\] has shape \(1, 32\) but .* takes \(items, sequence, \d+\)"),
    ],
)
def test_bad_modality_inputs_raise_clear_errors(change, message):
    model = tiny_model()
    inputs = make_inputs(model.config, [["image", "video", "imu", "text"]])
    change(inputs)
    with pytest.raises((ValueError, TypeError), match=message):
        model(**inputs)


def test_items_without_placeholders_are_rejected():
    model = tiny_model()
    inputs = make_inputs(model.config, [["text"]])
    with pytest.raises(ValueError, match="image: the text has 0 <image> placeholder tokens .* but 1 image items"):
        model(**inputs, pixel_values=torch.randn(1, 3, 32, 32))


def test_truncated_placeholder_run_is_named():
    model = tiny_model()
    inputs = make_inputs(model.config, [["text", "image"], ["image", "text"]])
    inputs["input_ids"][0, -3:] = 7  # cut into sample 0's run
    inputs["input_ids"][1, -3:] = model.config.image_token_id  # same total, split 5 + 11
    with pytest.raises(ValueError, match="sample 0 has a run of 5 <image> tokens at position .*, not a multiple of the 8"):
        model(**inputs)


def test_an_items_tokens_split_by_text_are_refused():
    model = tiny_model()
    inputs = make_inputs(model.config, [["text", "image", "text"]])
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(model.config.image_token_id)
    split = ids[:start + 4] + [7, 7] + ids[start + 4 : start + 8] + ids[start + 8 :]  # 4 tokens, text, 4 tokens
    inputs["input_ids"] = torch.tensor([split])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    assert split.count(model.config.image_token_id) == model.config.num_tokens["image"]  # the count alone is right
    with pytest.raises(ValueError, match=f"sample 0 has a run of 4 <image> tokens at position {start}.*split"):
        model(**inputs)
    two = make_inputs(model.config, [["text", "image", "image", "text"]])  # adjacent items: one run of 16
    assert model(**two).logits.isfinite().all()


def test_modality_missing_from_the_model_is_named():
    config = tiny_config()
    config = AnyMALConfig(**{**config.to_dict(), "audio_config": None, "audio_token_id": None})
    model = AnyMALForConditionalGeneration(config).eval()
    inputs = make_inputs(config, [["text"]])
    with pytest.raises(ValueError, match="no audio modality"):
        model(**inputs, input_features=torch.randn(1, 1, 10, 64))


# IMU2CLIP compatibility


class IMU2CLIPBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size, dilation=2, bias=False),
                                 nn.MaxPool1d(3))

    def forward(self, x):
        return self.net(x)


class IMU2CLIPEncoder(nn.Module):
    """The layer layout of IMU2CLIP's released `MW2StackRNNPooling`, to check weight conversion against."""

    def __init__(self, input_dim=32, size_embeddings=512):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(2, 6), IMU2CLIPBlock(6, input_dim, 10), IMU2CLIPBlock(input_dim, input_dim, 5),
            IMU2CLIPBlock(input_dim, input_dim, 5), nn.GroupNorm(4, input_dim),
            nn.GRU(batch_first=True, input_size=input_dim, hidden_size=size_embeddings),
        )

    def forward(self, batch):
        return self.net(batch)[1][0]


def test_imu2clip_checkpoint_converts_to_identical_embeddings(tmp_path):

    reference = IMU2CLIPEncoder().eval()
    for parameter in reference.parameters():  # GroupNorm affine weights away from their identity init
        nn.init.normal_(parameter, std=0.1)
    checkpoint = tmp_path / "imu2clip.ckpt"
    torch.save({"state_dict": {f"imu_encoder.{k}": v for k, v in reference.state_dict().items()},
                "epoch": 3}, checkpoint)
    script = TINY.parents[1] / "examples" / "convert_imu2clip_checkpoint.py"
    run_python(script, "--checkpoint", checkpoint, "--output_dir", tmp_path / "imu")

    encoder = AutoModel.from_pretrained(tmp_path / "imu").eval()
    assert isinstance(encoder, AnyMALIMUEncoder) and encoder.config.hidden_size == 512
    recordings = torch.randn(3, 6, 1000)  # 5 s at 200 Hz
    with torch.no_grad():
        assert torch.allclose(encoder(recordings).pooler_output, reference(recordings), atol=1e-6)


def test_a_model_offloaded_to_disk_generates_the_same_tokens(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    whole = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    offloaded = AutoModelForMultimodalLM.from_pretrained(  # a third of the weights in memory, the rest on disk
        tmp_path / "model", device_map="auto", max_memory={"cpu": weights // 3}, offload_folder=tmp_path / "offload"
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=5, do_sample=False), whole)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_projector_outputs_move_to_the_language_models_device(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model.config, [ALL])
    with torch.no_grad():
        expected = model(**inputs).logits
    device_map = {"model.encoders": 1, "model.projectors": 1, "model.language_model": 0, "lm_head": 1}
    split = AutoModelForMultimodalLM.from_pretrained(tmp_path, device_map=device_map)
    with torch.no_grad():
        logits = split(**{key: value.to("cuda:1") for key, value in inputs.items()}).logits
    assert split.model.projectors["image"].proj.weight.device == torch.device("cuda:1")
    assert split.model.language_model.embed_tokens.weight.device == torch.device("cuda:0")
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-3, atol=1e-3)
