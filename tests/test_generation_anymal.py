"""Generation: one test per behaviour that AnyMAL adds to transformers' `generate` (see the comment above
`AnyMALForConditionalGeneration.generate`), so that an upstream change fails here rather than for a user."""

import warnings

import pytest
import torch
from transformers import CompileConfig, GenerationConfig
from transformers.cache_utils import Cache

from transformers_anymal import MODALITIES
from transformers_anymal.compatibility_anymal import CACHE_NAME

from anymal_tester import make_inputs, tiny_config, tiny_model


ALL = ["text", "image", "text", "video", "audio", "imu", "text"]
# every modality with one item in some samples and two in others, so that repeating items per sample is tested
UNEVEN = [ALL, ["text"], ["image", "image", "audio", "audio", "text"], ["imu", "imu", "text", "video", "video"]]


def cut_out(model, batch: dict, samples: list, i: int) -> dict:
    """Sample `i` of `batch` alone: without its left padding and with only its own items."""
    keep = batch["attention_mask"][i].bool()
    alone = {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep]}
    for name in model.config.modalities:
        key, before = MODALITIES[name].input_name, sum(s.count(name) for s in samples[:i])
        if samples[i].count(name):
            alone[key] = batch[key][before : before + samples[i].count(name)]
    return alone


def test_greedy_generation_is_the_same_with_and_without_cache():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_static_cache_gives_the_same_tokens():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    dynamic = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static"),
                       dynamic)


def test_a_fullgraph_compiled_decoding_step_gives_the_dynamic_cache_tokens():
    # transformers' test_generate_compile_model_forward_fullgraph: with `_can_compile_fullgraph`, generate compiles the
    # decoding step with a static cache; fullgraph=True fails on any graph break (a placeholder scan, a host sync).
    # The "eager" backend traces with dynamo as inductor does, without generating code.
    model = tiny_model()
    assert model._can_compile_fullgraph
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    dynamic = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only, unless told otherwise
    torch._dynamo.reset()
    compiled = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static",
                              compile_config=compile_config)
    assert torch.equal(compiled, dynamic)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really went through dynamo


def test_chunked_prefill_gives_the_same_tokens():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    whole = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert inputs["input_ids"].shape[1] > 3 * 8  # several chunks, with placeholder runs split between them
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False, prefill_chunk_size=8), whole)


def narrower_model(seed: int):
    """A tiny AnyMAL whose language model is narrower than the default one's, as a draft model is."""
    config = tiny_config()
    config.text_config.hidden_size, config.text_config.intermediate_size = 32, 64
    return tiny_model(config, seed=seed)


@pytest.mark.parametrize("assistant", ["same size", "narrower"])
@pytest.mark.parametrize("sample", [ALL, ["text", "imu", "text", "imu"]], ids=["every modality", "two IMU items"])
def test_assisted_decoding_gives_the_greedy_tokens(assistant, sample):
    model = tiny_model()
    draft = tiny_model(seed=1) if assistant == "same size" else narrower_model(seed=1)
    inputs = make_inputs(model.config, [sample])
    greedy = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=10, do_sample=False, assistant_model=draft), greedy)


def test_prompt_lookup_decoding_gives_the_greedy_tokens():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL], text_length=12)  # text that the continuation may repeat
    greedy = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3), greedy)


def test_generation_from_inputs_embeds_equals_generation_from_input_ids():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL, ["text", "audio", "text"]])
    from_ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    media = {key: value for key, value in inputs.items() if key != "input_ids"}
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), **media,
                                 max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, -6:])  # generate returns only the new tokens for embeddings


def test_the_cache_continues_a_forward_under_either_name():
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL])
    prefix = {"input_ids": inputs["input_ids"][:, :-1], "attention_mask": inputs["attention_mask"][:, :-1]}
    prefix.update({key: value for key, value in inputs.items() if key not in prefix})
    with torch.no_grad():
        whole = model(**inputs).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = getattr(model(**prefix, use_cache=True), CACHE_NAME)  # `cache` from 5.24 on, then the old name
            assert isinstance(cache, Cache) and cache.get_seq_length() == prefix["input_ids"].shape[1]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = model(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"],
                             **{name: cache})
            assert torch.allclose(step.logits[:, -1], whole, atol=1e-5), name
            deprecated = any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
            assert deprecated == (name == "past_key_values" and CACHE_NAME == "cache"), name  # as transformers' own
        with pytest.raises(ValueError, match="Pass the key/value cache once"):
            model(**inputs, cache=cache, past_key_values=type(cache)())


def test_a_decoding_step_takes_a_sampled_placeholder_as_a_token_and_looks_for_none(monkeypatch):
    model = tiny_model()
    inputs = make_inputs(model.config, [ALL])
    scans, find = [], type(model.model).placeholder_positions
    monkeypatch.setattr(type(model.model), "placeholder_positions",
                        lambda self, name, *args: scans.append(name) or find(self, name, *args))
    with torch.no_grad():
        cache = getattr(model(**inputs, use_cache=True), CACHE_NAME)
        scans.clear()
        # a manual decoding loop whose model sampled <image>: an ordinary token, no error, no scan (a host sync)
        step = model(input_ids=torch.full((1, 1), model.config.image_token_id), **{CACHE_NAME: cache})
        assert scans == [] and step.logits.shape[:2] == (1, 1) and torch.isfinite(step.logits).all()
        # placeholders in a new prompt on the cache still need their media
        with pytest.raises(ValueError, match="placeholder tokens but no image input"):
            model(input_ids=torch.full((1, model.config.num_tokens["image"]), model.config.image_token_id),
                  **{CACHE_NAME: cache})


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_generation_equals_one_by_one(num_beams):
    model = tiny_model()
    batch = make_inputs(model.config, UNEVEN)
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=num_beams)
    for i, sample in enumerate(UNEVEN):
        single = model.generate(**cut_out(model, batch, UNEVEN, i), max_new_tokens=6, do_sample=False,
                                num_beams=num_beams)
        assert torch.equal(single[0, -6:], batched[i, -6:]), f"sample {i} {sample} differs in the batch"


def test_several_sequences_per_prompt_keep_their_own_items():
    model = tiny_model()
    batch = make_inputs(model.config, UNEVEN)
    returned = model.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert returned.shape[0] == 2 * len(UNEVEN)
    for i in range(len(UNEVEN)):
        single = model.generate(**cut_out(model, batch, UNEVEN, i), max_new_tokens=5, num_beams=3,
                                num_return_sequences=2, do_sample=False)
        assert torch.equal(single[:, -5:], returned[2 * i : 2 * i + 2, -5:]), f"sample {i}"


def test_sampling_with_several_sequences_per_prompt():
    model = tiny_model()
    inputs = make_inputs(model.config, [["image", "audio", "text"], ["imu", "text"]])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    prompt_length = inputs["input_ids"].shape[1]
    assert out.shape == (6, prompt_length + 3)
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"].repeat_interleave(3, dim=0))  # each under its prompt
    assert not set(out[:, prompt_length:].flatten().tolist()) & {  # sampling never draws a placeholder either
        getattr(model.config, f"{name}_token_id") for name in model.config.modalities}


def test_each_item_is_encoded_once_per_generate_call():
    model = tiny_model()
    calls = {}
    for name, projector in model.model.projectors.items():
        projector.register_forward_hook(lambda module, args, output, name=name: calls.update({name: calls.get(name, 0) + 1}))
    encoder_calls = []
    for encoder in model.model.encoders.values():
        encoder.register_forward_hook(lambda module, args, output: encoder_calls.append(args[0].shape[0]))
    batch = make_inputs(model.config, UNEVEN)
    model.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=2)
    assert calls == {name: 1 for name in model.config.modalities}  # not again for each decoding step or beam
    frames = model.config.num_frames
    items = sum(s.count("image") + frames * s.count("video") + s.count("audio") + s.count("imu") for s in UNEVEN)
    assert sum(encoder_calls) == items


def test_text_only_generation_without_any_modality():
    model = tiny_model()
    inputs = make_inputs(model.config, [["text", "text"]])
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("user_suppression", ["none", "argument", "generation_config"])
def test_placeholders_are_never_generated(user_suppression):
    model = tiny_model()
    placeholder_ids = [getattr(model.config, f"{name}_token_id") for name in model.config.modalities]
    other_id = 10
    with torch.no_grad():  # make the untrained model prefer the placeholders, then one ordinary token
        model.lm_head.weight[placeholder_ids] = model.lm_head.weight[placeholder_ids] * 0 + 10.0
        model.lm_head.weight[other_id] = model.lm_head.weight[other_id] * 0 + 5.0
    inputs = make_inputs(model.config, [["image", "text"]])
    options = {"none": {}, "argument": {"suppress_tokens": [other_id]},
               "generation_config": {"generation_config": GenerationConfig(suppress_tokens=[other_id])}}
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, **options[user_suppression])
    new_tokens = set(generated[0, inputs["input_ids"].shape[1] :].tolist())
    assert not new_tokens & set(placeholder_ids)
    assert (other_id in new_tokens) == (user_suppression == "none")  # the user's own suppression still holds


def test_generate_takes_precomputed_embeddings_or_media_not_both():
    model = tiny_model()
    inputs = make_inputs(model.config, [["image", "text"]])
    prompt_embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match=r"Pass either prompt_embeds or media inputs"):
        model(**inputs, prompt_embeds=prompt_embeds)


@pytest.mark.parametrize("media_again", [False, True])
def test_generation_continues_from_a_cache_without_the_media_it_holds(media_again):
    # transformers' test_generate_continue_from_past_key_values: the continuation gets the whole sequence and the
    # cache; media already in the cache need not be passed again (when they are, they are not encoded twice)
    model = tiny_model()
    inputs = make_inputs(model.config, [["text", "image", "text", "audio"], ["imu", "text", "video", "text"]])
    whole = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    media = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1]:])], 1)
    encoded = []
    hook = model.model.encoders["image"].register_forward_hook(lambda *args: encoded.append(1))
    continued = model.generate(input_ids=first.sequences, attention_mask=attention_mask,
                               **{CACHE_NAME: getattr(first, CACHE_NAME)}, **(media if media_again else {}),
                               max_new_tokens=1, do_sample=False)
    hook.remove()
    assert torch.equal(continued, whole)
    assert not encoded  # the cached image is not encoded again
