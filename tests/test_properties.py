"""Property-based checks of the input surfaces (processor, chat template, collator, forward, pipeline): whatever
comes in is either refused with a ValueError/TypeError that names the input, or accepted and turned into finite,
deterministic values of the right shape. Derandomised and bounded, so CI runs the same examples every time."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from transformers_anymal import AnyMALDataCollator

from anymal_tester import make_inputs


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


BOUNDED = settings(max_examples=30, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NAMED = (ValueError, TypeError)


def values(dtypes, shapes):
    """Arrays of the given dtypes and shapes, with any value the dtype holds (NaN, infinities, extremes)."""
    return st.sampled_from(dtypes).flatmap(lambda dtype: shapes.flatmap(lambda shape: arrays(dtype, shape)))


def accepted_or_named(call, name: str):
    """`call()`'s result, or None when it raised an error naming `name`; any other failure fails the test."""
    try:
        return call()
    except NAMED as error:
        assert name in str(error), f"the error does not name the {name}: {error}"
        return None


@BOUNDED
@given(waveform=values([np.float32, np.float64, np.int16, np.int32, np.uint8],
                       st.tuples(st.integers(0, 3000)) | st.tuples(st.integers(1, 3), st.integers(0, 50))),
       rate=st.sampled_from([8_000, 16_000, 48_000]))
def test_audio_is_refused_by_name_or_gives_finite_deterministic_features(processor, waveform, rate):
    def features():
        return processor(text="<audio>", audio=waveform, sampling_rate=rate, return_tensors="pt")["input_features"]

    first = accepted_or_named(features, "audio")
    if first is not None:
        assert first.isfinite().all() and torch.equal(first, features())


@BOUNDED
@given(image=values([np.uint8, np.uint16, np.int64, np.float32, np.float64],
                    st.tuples(st.integers(0, 40), st.integers(0, 40))
                    | st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 3, 4]))))
def test_images_are_refused_by_name_or_give_finite_pixels_of_the_encoders_size(processor, image):
    pixels = accepted_or_named(lambda: processor(text="<image>", images=image, return_tensors="pt")["pixel_values"], "image")
    if pixels is not None:  # on CLIP's normalised scale, whatever the dtype: within (0 - mean) / std, (1 - mean) / std
        # (at most 2.15), widened by the overshoot of bicubic resizing at a 0-to-255 edge (up to 7%: 2.4)
        assert pixels.shape == (1, 3, 32, 32) and pixels.isfinite().all() and pixels.abs().max() < 2.45


@BOUNDED
@given(recording=values([np.float32, np.float64, np.int16],
                        st.tuples(st.integers(0, 700)) | st.tuples(st.integers(0, 8), st.integers(0, 700))),
       rate=st.sampled_from([None, 50, 100, 200]))
def test_imu_is_refused_by_name_or_gives_finite_windows(processor, recording, rate):
    window = accepted_or_named(lambda: processor(text="<imu>", imu=recording, imu_sampling_rate=rate, return_tensors="pt")["imu_values"],
                               "imu")
    if window is not None:
        assert window.shape == (1, 6, 1000) and window.isfinite().all()


BLOCKS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | st.none()}),
    st.fixed_dictionaries({"type": st.just("image"), "image": st.just(np.zeros((8, 8, 3), np.uint8))}),
    st.fixed_dictionaries({"type": st.just("imu"), "imu": st.just(np.ones((6, 200))),
                           "sampling_rate": st.just(100)}),
    st.fixed_dictionaries({"type": st.sampled_from(["smell", "audio", "video"])}),
    st.text(max_size=5),
)
MESSAGES = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": st.none() | st.text(max_size=20) | st.lists(BLOCKS, max_size=3),
})


def media_blocks(chat) -> dict[str, int]:
    counts = {}
    for message in chat:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if isinstance(block, dict) and block["type"] in ("image", "imu"):
                counts[block["type"]] = counts.get(block["type"], 0) + 1
    return counts


@BOUNDED
@given(chat=st.lists(MESSAGES, max_size=4))
def test_chats_are_refused_by_name_or_give_one_run_per_media_block(processor, chat):
    inputs = accepted_or_named(lambda: processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt"),
                               "" if not chat else "message")
    if inputs is not None:
        for name, count in media_blocks(chat).items():
            placeholders = int((inputs["input_ids"] == getattr(processor, f"{name}_token_id")).sum())
            assert placeholders == count * processor.num_tokens[name]


@BOUNDED
@given(rows=st.lists(st.fixed_dictionaries({
    "messages": st.lists(MESSAGES, min_size=0, max_size=3),
}), min_size=0, max_size=3))
def test_collator_rows_are_refused_by_name_or_train_on_their_answers(processor, rows):
    collator = AnyMALDataCollator(processor)
    batch = accepted_or_named(lambda: collator(rows), "row" if rows else "batch")
    if batch is not None:
        assert batch["input_ids"].shape == batch["labels"].shape
        assert (batch["labels"] != -100).sum(-1).gt(0).all()  # every row trains on something


@BOUNDED
@given(items=st.integers(0, 3), runs=st.lists(st.integers(0, 20), min_size=1, max_size=3))
def test_forward_refuses_placeholder_runs_that_do_not_fit_the_items(model, items, runs):
    config = model.config
    inputs = make_inputs(config, [["text"]])
    pieces = [inputs["input_ids"][0]]
    for length in runs:  # runs of image placeholders with text between them
        pieces += [torch.full((length,), config.image_token_id), torch.tensor([7, 8])]
    inputs["input_ids"] = torch.cat(pieces)[None]
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    pixels = torch.randn(items, 3, 32, 32) if items else None
    fits = sum(runs) == items * config.num_tokens["image"] and all(
        length % config.num_tokens["image"] == 0 for length in runs)
    with torch.no_grad():
        logits = accepted_or_named(lambda: model(**inputs, pixel_values=pixels).logits, "image")
    assert (logits is not None) == fits
    if logits is not None:
        assert logits.isfinite().all()


@settings(max_examples=15, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30))
def test_pipeline_text_is_answered_or_refused_by_name(model, processor, text):
    pipe = pipeline("any-to-text", model=model, processor=processor)
    result = accepted_or_named(lambda: pipe([{"role": "user", "content": text}], max_new_tokens=2,
                                            return_full_text=False), "message")
    if result is not None:
        assert isinstance(result[0]["generated_text"], str)
