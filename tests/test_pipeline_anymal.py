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
    assert isinstance(new["generated_text"], str) and new["generated_text"]
    [full] = pipe(chat, max_new_tokens=5)
    assert full["generated_text"][:-1] == chat  # the chat itself, media included, to continue the conversation
    assert full["generated_text"][-1] == {"role": "assistant", "content": new["generated_text"]}


def test_input_text_describes_media_instead_of_printing_them(pipe):
    chat = image_and_imu_chat()
    [output] = pipe(chat, max_new_tokens=2, return_full_text=False)
    assert output["input_text"] == [{"role": "user", "content": [
        {"type": "image", "image": "<Image RGB 40x40>"},
        {"type": "imu", "imu": "<ndarray float64 (6, 300)>", "sampling_rate": 100},
        {"type": "text", "text": "What is the person doing?"},
    ]}]
    assert len(repr(output)) < 300


def test_answers_come_back_without_surrounding_spaces(pipe):
    chat = image_and_imu_chat()
    prompt_length = len(pipe.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, return_tensors="pt")["input_ids"][0])
    space, vocabulary = pipe.processor.tokenizer.convert_tokens_to_ids("\u0120"), len(pipe.processor.tokenizer)

    def spaces_first(batch, ids):  # the answer begins with two spaces, as a real model's answer may
        return [space] if len(ids) < prompt_length + 2 else list(range(vocabulary))

    options = dict(max_new_tokens=6, prefix_allowed_tokens_fn=spaces_first)
    [tokens] = pipe(chat, return_tensors=True, **options)
    answer = pipe.processor.decode(tokens["generated_token_ids"][prompt_length:], skip_special_tokens=True)
    assert answer.startswith("  ") and answer.strip()
    assert pipe(chat, return_full_text=False, **options)[0]["generated_text"] == answer.strip()
    assert pipe(chat, **options)[0]["generated_text"][-1]["content"] == answer.strip()


def test_keyword_text_is_templated_like_a_chat(pipe):
    rng = np.random.default_rng(0)
    image, recording = Image.new("RGB", (20, 20)), rng.standard_normal((300, 6))
    keywords = dict(images=image, imu=recording, imu_sampling_rate=100, max_new_tokens=4)
    [new] = pipe(text="<image>\n<imu>\nWhat is it?", return_full_text=False, **keywords)
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "imu", "imu": recording, "sampling_rate": 100},
                                         {"type": "text", "text": "What is it?"}]}]
    assert new == {"input_text": "<image>\n<imu>\nWhat is it?",
                   "generated_text": pipe(chat, max_new_tokens=4, return_full_text=False)[0]["generated_text"]}
    [full] = pipe(text="<image>\n<imu>\nWhat is it?", **keywords)
    assert full["generated_text"].startswith("<image>\n<imu>\nWhat is it?") and "[/INST]" not in full["generated_text"]
    [plain] = pipe("Only text here.", max_new_tokens=4, return_full_text=False)
    chat = [{"role": "user", "content": "Only text here."}]
    assert plain["generated_text"] == pipe(chat, max_new_tokens=4, return_full_text=False)[0]["generated_text"]


def test_streaming_yields_the_same_text(pipe):
    chat = image_and_imu_chat()
    expected = pipe(chat, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=pipe, args=(chat,), kwargs={"max_new_tokens": 6, "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == expected


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


@pytest.mark.parametrize("text", [[], [[]], [image_and_imu_chat(), []]], ids=["nothing", "an empty chat", "one empty"])
def test_an_empty_chat_is_named(pipe, text):
    with pytest.raises(ValueError, match="The pipeline got an empty chat"):
        pipe(text, max_new_tokens=2)


def test_an_unknown_content_type_is_named(pipe):
    with pytest.raises(ValueError, match="unknown content type 'smell'"):
        pipe([{"role": "user", "content": [{"type": "smell", "smell": "roses"}]}], max_new_tokens=2)
