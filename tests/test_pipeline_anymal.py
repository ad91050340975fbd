import threading

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, TextIteratorStreamer, pipeline

from transformers_anymal import AnyMALConfig, AnyMALForConditionalGeneration, AnyToTextPipeline

from anymal_tester import TINY, tiny_config, tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("anymal-tiny-checkpoint")
    tiny_model().save_pretrained(path)
    AutoProcessor.from_pretrained(TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return pipeline("any-to-text", model=str(checkpoint))


def image_and_imu_chat(seed=0, question="What is the person doing?"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return [{"role": "user", "content": [
        {"type": "image", "image": image},
        {"type": "imu", "imu": rng.standard_normal((6, 300)), "sampling_rate": 100},
        {"type": "text", "text": question},
    ]}]


def test_answers_a_chat_with_an_image_and_an_imu_recording(pipe):
    assert isinstance(pipe, AnyToTextPipeline)
    chat = image_and_imu_chat()
    [new] = pipe(chat, max_new_tokens=5, return_full_text=False)
    assert new["input_text"] == chat and isinstance(new["generated_text"], str) and new["generated_text"]
    [full] = pipe(chat, max_new_tokens=5)
    assert full["generated_text"][:-1] == chat
    assert full["generated_text"][-1] == {"role": "assistant", "content": new["generated_text"]}


def test_a_batch_of_chats_equals_one_by_one(pipe):
    chats = [image_and_imu_chat(0), [{"role": "user", "content": "Only text here."}], image_and_imu_chat(1, "And?")]
    batched = pipe(chats, max_new_tokens=5, return_full_text=False)
    assert len(batched) == 3 and all(len(outputs) == 1 for outputs in batched)
    for chat, [output] in zip(chats, batched):
        assert pipe(chat, max_new_tokens=5, return_full_text=False)[0]["generated_text"] == output["generated_text"]
    in_pairs = pipe(chats, max_new_tokens=5, return_full_text=False, batch_size=2)
    assert [o[0]["generated_text"] for o in in_pairs] == [o[0]["generated_text"] for o in batched]


def test_keyword_inputs(pipe):
    rng = np.random.default_rng(0)
    [output] = pipe(text="<image>\n<imu>\nWhat is it?", images=Image.new("RGB", (20, 20)),
                    imu=rng.standard_normal((300, 6)), imu_sampling_rate=100, max_new_tokens=3,
                    return_full_text=False)
    assert output["input_text"] == "<image>\n<imu>\nWhat is it?" and output["generated_text"]


def test_streaming_yields_the_same_text(pipe):
    chat = image_and_imu_chat()
    expected = pipe(chat, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=pipe, args=(chat,), kwargs={"max_new_tokens": 6, "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == expected


def test_generation_options_pass_through(pipe):
    chat = image_and_imu_chat()
    sampled = pipe(chat, max_new_tokens=4, do_sample=True, num_return_sequences=3, return_full_text=False)
    assert len(sampled) == 3
    beams = pipe(chat, max_new_tokens=4, num_beams=2, return_full_text=False)
    assert beams == pipe(chat, max_new_tokens=4, generate_kwargs={"num_beams": 2}, return_full_text=False)


def test_the_built_in_any_to_any_pipeline_runs_the_model(checkpoint):
    any_to_any = pipeline("any-to-any", model=str(checkpoint))
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (20, 20)), },
                                         {"type": "text", "text": "Describe."}]}]
    [output] = any_to_any(text=chat, max_new_tokens=3, return_full_text=False)
    assert isinstance(output["generated_text"], str)


def test_a_modality_the_model_lacks_is_named(checkpoint, tmp_path):
    config = tiny_config()
    config = AnyMALConfig(**{**config.to_dict(), "imu_config": None, "imu_token_id": None})
    AnyMALForConditionalGeneration(config).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(TINY).save_pretrained(tmp_path)
    without_imu = pipeline("any-to-text", model=str(tmp_path))
    with pytest.raises(ValueError, match="This model has no imu modality"):
        without_imu(image_and_imu_chat(), max_new_tokens=2)


def test_a_checkpoint_without_processor_files_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(OSError, match="Cannot load an AnyMALProcessor from .* it needs processor_config.json"):
        pipeline("any-to-text", model=str(tmp_path))


def test_an_unknown_content_type_is_named(pipe):
    with pytest.raises(ValueError, match="unknown content type 'smell'"):
        pipe([{"role": "user", "content": [{"type": "smell", "smell": "roses"}]}], max_new_tokens=2)
