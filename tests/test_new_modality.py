"""A fifth modality takes one registry entry plus configuration: depth maps through a second vision encoder, end to
end (processor, chat template, collator, training step, generation, pipeline) and loaded in fresh processes, with
the package and with `trust_remote_code` alone, without registering anything there."""

import json
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, pipeline

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALDataCollator,
    AnyMALForConditionalGeneration,
    AnyMALProcessor,
    ModalitySpec,
    register_modality,
    unregister_modality,
)

from anymal_tester import FIRST_SPECIAL_ID, TINY, tiny_config
from child_process import run_python


DEPTH = ModalitySpec("<depth>", "depth_values", "clip_vision_model", "perceiver",
                     ("num_channels", "image_size", "image_size"), num_tokens=4,
                     input_modality="image", preprocess="image_processor")  # read as images, CLIP-preprocessed
DEPTH_ENCODER = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # the image processor's 32x32 crops


@pytest.fixture
def depth():
    register_modality("depth", DEPTH)
    yield
    unregister_modality("depth")


def depth_map(seed: int, size=(48, 40)) -> np.ndarray:
    """A depth map in metres, as a depth camera gives it, scaled to the 0-1 of float images."""
    metres = np.random.default_rng(seed).uniform(0.5, 4.0, size)
    return (metres / 4.0).astype(np.float32)


def depth_checkpoint():
    """The tiny AnyMAL plus a depth modality: `<depth>` added to the tokenizer, its own CLIP tower and projector."""
    tiny = AnyMALProcessor.from_pretrained(TINY)
    tokenizer = tiny.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<depth>"]})
    base = tiny_config().to_dict()
    base["text_config"]["vocab_size"] = len(tokenizer)
    config = AnyMALConfig(**{**base, "depth_config": DEPTH_ENCODER,
                             "depth_token_id": tokenizer.convert_tokens_to_ids("<depth>")})
    torch.manual_seed(0)
    model = AnyMALForConditionalGeneration(config).eval()
    processor = AnyMALProcessor(tiny.image_processor, tiny.video_processor, tiny.feature_extractor,
                                tiny.imu_feature_extractor, tokenizer, num_tokens=config.num_tokens)
    return model, processor


def chat(depth_item, answer=None):
    messages = [{"role": "user", "content": [depth_item, {"type": "text", "text": "How far is the wall?"}]}]
    return messages + [{"role": "assistant", "content": answer}] * (answer is not None)


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


def test_processor_template_and_collator_take_depth_from_the_registry_alone(depth):
    model, processor = depth_checkpoint()
    assert processor.modalities == ["image", "video", "audio", "imu", "depth"]
    assert "depth_values" in processor.model_input_names

    inputs = processor(text="<depth> How far?", depth=depth_map(0), return_tensors="pt")
    assert inputs["depth_values"].shape == (1, 3, 32, 32)  # resized and cropped by the image processor
    assert (inputs["input_ids"] == model.config.depth_token_id).sum() == 4
    with pytest.raises(ValueError, match="sample 0 has 1 <depth> placeholder.* but no depth were given"):
        processor(text="<depth> How far?")

    prompt = processor.apply_chat_template(chat({"type": "depth", "depth": depth_map(0)}), tokenize=False,
                                           add_generation_prompt=True)
    assert "<depth>\nHow far is the wall?" in prompt
    with pytest.raises(ValueError, match="unknown content type 'smell'; use one of text, .*depth"):
        processor.apply_chat_template(chat({"type": "smell", "smell": 1.0}), tokenize=True)

    rows = [{"messages": chat({"type": "depth", "depth": depth_map(1)}, "two metres")},  # the item inline
            {"messages": chat({"type": "depth"}, "one metre"), "depths": [depth_map(2)]},  # TRL's list column
            {"messages": chat({"type": "depth"}, "four metres"), "depth": depth_map(3)}]  # one item per row
    batch = AnyMALDataCollator(processor)(rows)
    assert batch["depth_values"].shape == (3, 3, 32, 32)
    answers = [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert [answer.strip() for answer in answers] == ["two metres </s>", "one metre </s>", "four metres </s>"]
    one_by_one = processor(text="<depth>" * 3, depth=[depth_map(1), depth_map(2), depth_map(3)], return_tensors="pt")
    assert torch.equal(batch["depth_values"], one_by_one["depth_values"])  # each block took its own row's item

    # one training step moves the depth projector and nothing frozen
    model.train()
    model.requires_grad_(False)
    model.model.projectors["depth"].requires_grad_(True)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    assert torch.isfinite(loss) and changed and all(key.startswith("model.projectors.depth.") for key in changed)


def test_a_depth_checkpoint_generates_and_loads_in_fresh_processes(depth, tmp_path):
    model, processor = depth_checkpoint()
    pipe = pipeline("any-to-text", model=model, processor=processor)
    conversation = chat({"type": "depth", "depth": depth_map(0)})
    [from_chat] = pipe(conversation, max_new_tokens=4, do_sample=False, return_full_text=False)
    keyword = pipe(text="<depth>\nHow far is the wall?", depth=depth_map(0), max_new_tokens=4, do_sample=False,
                   return_full_text=False)
    assert from_chat["generated_text"] == keyword[0]["generated_text"]  # keyword text goes through the template too

    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist()
    model.register_for_auto_class("AutoModelForMultimodalLM")  # the code files, for trust_remote_code
    processor.register_for_auto_class()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    np.save(tmp_path / "depth.npy", depth_map(0))
    assert "depth" in json.loads((tmp_path / "config.json").read_text())["added_modalities"]

    for mode in ("installed", "remote"):
        loaded = json.loads(run_python("-c", textwrap.dedent(FRESH_LOAD), tmp_path, mode, timeout=300,
                                       cwd=tmp_path).stdout.strip().splitlines()[-1])
        assert loaded["package"] == (mode == "installed"), mode
        assert loaded["modalities"] == ["image", "video", "audio", "imu", "depth"], mode
        assert loaded["generated"] == expected, mode
        assert loaded["pipeline"] == from_chat["generated_text"], mode


FRESH_LOAD = """
import json, sys
import numpy as np
from transformers import AutoModelForMultimodalLM, AutoProcessor, pipeline

path, mode = sys.argv[1], sys.argv[2]
if mode == "remote":  # only transformers: the code comes from the checkpoint's folder
    sys.modules["transformers_anymal"] = None
else:
    import transformers_anymal  # noqa: F401
kwargs = {"trust_remote_code": True} if mode == "remote" else {}
if mode == "remote":  # the processor's own record of depth, then the model's
    processor = AutoProcessor.from_pretrained(path, **kwargs)
    model = AutoModelForMultimodalLM.from_pretrained(path, **kwargs).eval()
else:  # the config's record alone (the processor then finds depth registered, and agreeing with its own record)
    model = AutoModelForMultimodalLM.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
chat = [{"role": "user", "content": [{"type": "depth", "depth": np.load(path + "/depth.npy")},
                                     {"type": "text", "text": "How far is the wall?"}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist()
if mode == "remote":  # a local folder's config names no pipeline (pushed ones do): take its class from the folder
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    pipe = get_class_from_dynamic_module("pipeline_anymal.AnyToTextPipeline", path)(model=model, processor=processor)
else:
    pipe = pipeline("any-to-text", model=model, processor=processor)
[answer] = pipe(chat, max_new_tokens=4, do_sample=False, return_full_text=False)
print(json.dumps({"package": type(model).__module__.startswith("transformers_anymal"),
                  "modalities": processor.modalities, "generated": generated, "pipeline": answer["generated_text"]}))
"""


def test_a_recorded_spec_without_its_preprocessing_function_says_what_to_register(depth):
    custom = ModalitySpec(**{**DEPTH.to_dict(), "preprocess": lambda items, **options: torch.zeros(len(items), 3, 32, 32)})
    unregister_modality("depth")
    register_modality("depth", custom)
    model, processor = depth_checkpoint()
    assert processor(text="<depth>", depth=depth_map(0), return_tensors="pt")["depth_values"].abs().sum() == 0
    recorded = model.config.to_dict()["added_modalities"]
    assert recorded["depth"]["preprocess"] is None  # a function is not recordable

    unregister_modality("depth")  # a fresh process: only the config's record
    reloaded = AnyMALConfig(**model.config.to_dict())
    assert reloaded.modalities[-1] == "depth" and MODALITIES["depth"].preprocess is None
    with pytest.raises(ValueError, match=r"run the same register_modality\('depth', ModalitySpec\(..., preprocess="):
        processor(text="<depth>", depth=depth_map(0))


def test_registering_names_what_is_wrong():
    with pytest.raises(ValueError, match="'image' is a built-in modality"):
        register_modality("image", DEPTH)
    with pytest.raises(ValueError, match="'text' names something else"):
        register_modality("text", DEPTH)
    with pytest.raises(ValueError, match=r"ModalitySpec.token of 'mask' is already 'image'"):
        register_modality("mask", ModalitySpec("<image>", "mask_values", "vit", "linear", ("hidden_size",)))
    with pytest.raises(ValueError, match=r"ModalitySpec.argument of 'mask' is already 'image'"):
        register_modality("mask", ModalitySpec("<mask>", "mask_values", "vit", "linear", ("hidden_size",),
                                               argument="images"))
    with pytest.raises(ValueError, match=r"input_modality='smell'\) is not a kind of media"):
        register_modality("nose", ModalitySpec("<nose>", "nose_values", "vit", "linear", ("hidden_size",),
                                               input_modality="smell"))
    assert "nose" not in MODALITIES and "mask" not in MODALITIES


def test_a_checkpoint_whose_modality_differs_from_the_registered_one_is_refused(depth):
    model, _ = depth_checkpoint()
    recorded = model.config.to_dict()
    recorded["added_modalities"]["depth"]["projector"] = "linear"  # saved by a process where depth was linear
    with pytest.raises(ValueError, match=r"'depth' modality differs from the one registered in this process in "
                                         r"\['projector'\]"):
        AnyMALConfig(**recorded)


ANKLE = ModalitySpec("<ankle>", "ankle_values", "anymal_imu", "linear", ("num_channels", "window_length"),
                     num_tokens=4, input_modality="time", preprocess="imu_feature_extractor")  # a second IMU


@pytest.fixture
def ankle_processor():
    register_modality("ankle", ANKLE)
    tiny = AnyMALProcessor.from_pretrained(TINY)
    tiny.tokenizer.add_special_tokens({"additional_special_tokens": ["<ankle>"]})
    yield AnyMALProcessor(tiny.image_processor, tiny.video_processor, tiny.feature_extractor,
                          tiny.imu_feature_extractor, tiny.tokenizer)
    unregister_modality("ankle")


def test_an_added_time_series_modality_takes_its_rate_like_imu(ankle_processor):
    processor, recording = ankle_processor, np.random.default_rng(0).standard_normal((6, 300))
    expected = processor(text="<imu>", imu=recording, imu_sampling_rate=100, return_tensors="pt")["imu_values"]
    options = {}
    flat = processor(text="<ankle>", ankle=recording, ankle_sampling_rate=100, ankle_kwargs=options, return_tensors="pt")
    assert torch.equal(flat["ankle_values"], expected) and options == {}  # the caller's section is left as it was
    sectioned = processor(text="<ankle>", ankle=recording, ankle_kwargs={"sampling_rate": 100}, return_tensors="pt")
    assert torch.equal(sectioned["ankle_values"], expected)
    with pytest.raises(ValueError, match="no sampling rate"):
        processor(text="<ankle>", ankle=recording)

    chat = [{"role": "user", "content": [{"type": "ankle"}, {"type": "text", "text": "Walking?"}]},
            {"role": "assistant", "content": "yes"}]
    rows = [{"messages": chat, "ankles": [recording.tolist()], "ankle_sampling_rate": 100},  # the row's rate column
            {"messages": chat, "ankle": recording}]  # the collator's rate
    batch = AnyMALDataCollator(processor, sampling_rates={"ankle": 100})(rows)
    assert torch.equal(batch["ankle_values"], torch.cat([expected, expected]).to(batch["ankle_values"].dtype))
    with pytest.raises(ValueError, match=r"row 0: no ankle sampling rate; add a `ankle_sampling_rate` column"):
        AnyMALDataCollator(processor)(rows[1:])


def test_audio_stored_as_a_list_column_takes_the_rows_rate():
    processor = AutoProcessor.from_pretrained(TINY)
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Which digit?"}]},
            {"role": "assistant", "content": "three"}]
    from_list = AnyMALDataCollator(processor)([{"messages": chat, "audio": wave.tolist(), "audio_sampling_rate": 16000}])
    from_array = AnyMALDataCollator(processor, sampling_rates={"audio": 16000})([{"messages": chat, "audio": wave}])
    assert torch.equal(from_list["input_features"], from_array["input_features"])


def test_a_column_named_like_a_modality_the_model_lacks_is_left_alone(depth):
    processor = AutoProcessor.from_pretrained(TINY)  # no <depth>: depth is registered, but not this model's
    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"}]
    batch = AnyMALDataCollator(processor)([{"messages": chat, "depth": 3.5}])  # e.g. a dive log's numeric column
    assert "depth_values" not in batch


def test_the_kinds_a_spec_may_name_are_the_kinds_media_anymal_reads():
    from transformers_anymal.configuration_anymal import INPUT_MODALITIES
    from transformers_anymal.media_anymal import MEDIA_KINDS

    assert set(INPUT_MODALITIES) == set(MEDIA_KINDS)
    assert {spec.input_modality for spec in MODALITIES.values()} <= set(MEDIA_KINDS)
