"""The safety layer (§2.7 of the paper): input text and image checks before prefill, the output check while the
answer is generated, the image-answer association check; with the offline classifiers of the [safety] extra, tiny
transformers classifiers and a tiny guard LLM in the hooks."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    TextIteratorStreamer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from transformers_anymal import (
    AnyMALSafetyChecker,
    ClassifierCheck,
    EncoderFeatures,
    GuardModelCheck,
    NudeNetCheck,
    ProfanityCheck,
)

from anymal_tester import TINY


OFFENSIVE_PROMPTS = ["What the fuck is this, you idiot?", "Describe this, you stupid bitch.", "shit, what is it?"]
CLEAN_PROMPTS = ["What is the person doing?", "Which digit is shown?", "Describe the sound in one word."]
FORCED = " the answer is that you are a fucking idiot and then some more words"


@pytest.fixture(scope="module")
def profanity():
    pytest.importorskip("profanity_check", reason="needs the [safety] extra")
    return ProfanityCheck()


@pytest.fixture(scope="module")
def offline():
    pytest.importorskip("profanity_check", reason="needs the [safety] extra")
    pytest.importorskip("nudenet", reason="needs the [safety] extra")
    return AnyMALSafetyChecker.offline(check_every=4)


def card(text: str = "7", color: str = "white") -> Image.Image:
    image = Image.new("RGB", (48, 48), color)
    ImageDraw.Draw(image).text((18, 16), text, fill="black")
    return image


def chat(text: str, image: Image.Image | None = None) -> list[dict]:
    blocks = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


class ForceTokens(LogitsProcessor):
    """Makes row `row` generate `token_ids` (the others generate freely)."""

    def __init__(self, token_ids: list[int], row: int = 0):
        self.token_ids, self.row, self.start = token_ids, row, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        if step < len(self.token_ids):
            scores[self.row] = -float("inf")
            scores[self.row, self.token_ids[step]] = 0.0
        return scores


def first_offensive_length(tokenizer, token_ids: list[int], profanity) -> int:
    """How many of `token_ids` it takes for the text classifier to call the text offensive."""
    texts = [tokenizer.decode(token_ids[:n], skip_special_tokens=True) for n in range(1, len(token_ids) + 1)]
    return next(n for n, (score, _) in enumerate(profanity(texts), start=1) if score >= 0.5)


def test_the_offline_text_check_refuses_offensive_prompts_and_passes_clean_ones(offline):
    verdicts = [offline.check_input(chat(prompt)) for prompt in OFFENSIVE_PROMPTS + CLEAN_PROMPTS]
    assert all(verdict is not None and verdict.check == "input_text" and verdict.score >= 0.5
               for verdict in verdicts[: len(OFFENSIVE_PROMPTS)])
    assert verdicts[len(OFFENSIVE_PROMPTS):] == [None] * len(CLEAN_PROMPTS)


def test_the_offline_image_check_passes_clean_images():
    pytest.importorskip("nudenet", reason="needs the [safety] extra")
    rng = np.random.default_rng(0)
    images = [card("7"), card("3", "lightblue"), Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))]
    assert [score for score, _ in NudeNetCheck()(images)] == [0.0, 0.0, 0.0]


def test_a_clean_multimodal_prompt_answers_as_without_the_checker(model, processor, offline):
    plain = pipeline("any-to-text", model=model, processor=processor)
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    messages = chat("Which digit is shown?", card())
    expected = plain(messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    result = checked(messages, max_new_tokens=6, return_full_text=False)[0]
    assert result["generated_text"] == expected and result["safety"] is None


def test_an_offensive_prompt_is_refused_with_its_reason_and_nothing_is_generated(model, processor, offline,
                                                                                 monkeypatch):
    pipe = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    calls = []
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: calls.append(kwargs))
    result = pipe(chat(OFFENSIVE_PROMPTS[0], card()), max_new_tokens=6, return_full_text=False)[0]
    assert calls == []
    assert result["generated_text"] == offline.refusal
    assert result["safety"]["check"] == "input_text" and result["safety"]["score"] >= 0.5
    assert "input text check" in result["safety"]["reason"]
    full = pipe(chat(OFFENSIVE_PROMPTS[0]), max_new_tokens=6)[0]["generated_text"]  # the chat form of any-to-any
    assert full[-1] == {"role": "assistant", "content": offline.refusal}
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=60)
    pipe(chat(OFFENSIVE_PROMPTS[0]), max_new_tokens=6, streamer=streamer)
    assert "".join(streamer) == ""  # the stream ends, empty, rather than leaving its reader waiting


def test_one_blocked_chat_does_not_block_its_batch_neighbours(model, processor, offline):
    plain = pipeline("any-to-text", model=model, processor=processor)
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    chats = [chat(CLEAN_PROMPTS[0], card("1")), chat(OFFENSIVE_PROMPTS[1], card("2")), chat(CLEAN_PROMPTS[1])]
    results = checked(chats, max_new_tokens=5, return_full_text=False)
    expected = plain([chats[0], chats[2]], max_new_tokens=5, return_full_text=False)
    assert [records[0]["safety"] for records in (results[0], results[2])] == [None, None]
    assert results[0][0]["generated_text"] == expected[0][0]["generated_text"]
    assert results[2][0]["generated_text"] == expected[1][0]["generated_text"]
    assert results[1][0]["generated_text"] == offline.refusal and results[1][0]["safety"]["check"] == "input_text"


def test_keyword_text_is_checked_per_text_with_its_own_media(model, processor, offline):
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    plain = pipeline("any-to-text", model=model, processor=processor)
    results = checked(text=["<image> shit, what is it?", "<image> Which digit?"], images=[card("1"), card("2")],
                      max_new_tokens=4, return_full_text=False)
    assert results[0]["generated_text"] == offline.refusal and results[0]["safety"]["check"] == "input_text"
    alone = plain(text="<image> Which digit?", images=card("2"), max_new_tokens=4, return_full_text=False)
    assert results[1]["generated_text"] == alone[0]["generated_text"] and results[1]["safety"] is None


def test_an_answer_that_turns_offensive_stops_at_the_first_check_after_the_offending_tokens(
        model, processor, offline, profanity):
    tokenizer = processor.tokenizer
    forced = tokenizer(FORCED, add_special_tokens=False).input_ids
    offending = first_offensive_length(tokenizer, forced, profanity)
    stop = -(-offending // offline.check_every) * offline.check_every  # the first check that sees them
    inputs = processor.apply_chat_template(chat("Which digit?", card()), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    guard = offline.output_guard(tokenizer, prompt_length, streamer)
    shown = []
    reader = threading.Thread(target=lambda: shown.extend(streamer))
    reader.start()
    generated = model.generate(**inputs, max_new_tokens=len(forced), do_sample=False, stopping_criteria=[guard],
                               logits_processor=[ForceTokens(forced)], streamer=guard.streamer)
    reader.join()
    assert generated.shape[1] - prompt_length == stop < len(forced)  # generation ended right there
    verdict = guard.verdicts[0]
    assert verdict is not None and verdict.check == "output_text" and verdict.score >= 0.5
    passed = tokenizer.decode(forced[: stop - offline.check_every], skip_special_tokens=True)
    text = "".join(shown)  # only text that passed was ever shown, and only whole words of it
    full = tokenizer.decode(forced, skip_special_tokens=True)
    assert text and passed.startswith(text) and "fuck" not in text and full[len(text)].isspace()
    kept = guard.finish(generated)[0, prompt_length:]
    assert tokenizer.decode(kept, skip_special_tokens=True) == text  # the answer is what was shown


def test_the_pipeline_cuts_an_offensive_answer_and_leaves_its_batch_neighbour_alone(model, processor, offline):
    forced = processor.tokenizer(FORCED, add_special_tokens=False).input_ids
    chats = [chat("Which digit?", card("4")), chat("Which digit?", card("5"))]
    options = {"max_new_tokens": len(forced), "return_full_text": False}
    plain = pipeline("any-to-text", model=model, processor=processor)
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    expected = plain(chats, logits_processor=[ForceTokens(forced)], **options)
    results = checked(chats, logits_processor=[ForceTokens(forced)], **options)
    assert "fuck" in expected[0][0]["generated_text"]
    cut = results[0][0]
    assert "fuck" not in cut["generated_text"] and expected[0][0]["generated_text"].startswith(cut["generated_text"])
    assert cut["safety"]["check"] == "output_text"
    assert results[1][0]["generated_text"] == expected[1][0]["generated_text"] and results[1][0]["safety"] is None


def test_no_fragment_of_a_flagged_word_is_ever_streamed(model, processor):
    tokenizer = processor.tokenizer
    forced = tokenizer(FORCED, add_special_tokens=False).input_ids
    full = tokenizer.decode(forced, skip_special_tokens=True)
    assert len(tokenizer(" fucking", add_special_tokens=False).input_ids) > 1  # the word takes several tokens
    checker = AnyMALSafetyChecker(output_text=lambda text: float("fuck" in text), check_every=1)  # every token
    inputs = processor.apply_chat_template(chat("Which digit?"), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    guard = checker.output_guard(tokenizer, inputs["input_ids"].shape[1], streamer)
    pieces = []
    reader = threading.Thread(target=pieces.extend, args=(streamer,))
    reader.start()
    guard.finish(model.generate(**inputs, max_new_tokens=len(forced), do_sample=False, stopping_criteria=[guard],
                                logits_processor=[ForceTokens(forced)], streamer=guard.streamer))
    reader.join()
    assert "".join(pieces) == full[: full.index(" fucking")]  # " f", " fu", ... never shown


def test_a_streaming_pipeline_shows_only_checked_text(model, processor, offline):
    forced = processor.tokenizer(FORCED, add_special_tokens=False).input_ids
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    shown = []
    reader = threading.Thread(target=lambda: shown.extend(streamer))
    reader.start()
    result = checked(chat("Which digit?", card()), max_new_tokens=len(forced), return_full_text=False,
                     streamer=streamer, logits_processor=[ForceTokens(forced)])[0]
    reader.join()
    assert "".join(shown).strip() == result["generated_text"] and "fuck" not in "".join(shown)
    assert result["safety"]["check"] == "output_text"


def test_the_association_check_sees_the_images_and_the_answer(model, processor):
    seen = []

    def red_image_with_any_answer(item):  # stands in for a vision guard judging (image, answer)
        prompt, answer, images = item
        seen.append((prompt, answer, len(images)))
        return float(np.asarray(images[0])[..., 0].mean() > 200 and np.asarray(images[0])[..., 2].mean() < 50)

    checker = AnyMALSafetyChecker(association=red_image_with_any_answer)
    checked = pipeline("any-to-text", model=model, processor=processor, safety_checker=checker)
    plain = pipeline("any-to-text", model=model, processor=processor)
    red, blue = chat("What is it?", Image.new("RGB", (32, 32), "red")), chat("What is it?", card("7", "blue"))
    results = checked([red, blue, chat("No image here.")], max_new_tokens=4, return_full_text=False)
    expected = plain([red, blue], max_new_tokens=4, return_full_text=False)
    assert results[0][0]["generated_text"] == checker.refusal and results[0][0]["safety"]["check"] == "association"
    assert results[1][0]["generated_text"] == expected[1][0]["generated_text"] and results[1][0]["safety"] is None
    assert results[2][0]["safety"] is None
    assert [(prompt, count) for prompt, _, count in seen] == [("What is it?", 1), ("What is it?", 1)]
    assert seen[1][1].strip() == expected[1][0]["generated_text"]  # the answer it judged is the one returned


@pytest.fixture(scope="module")
def text_classifier():
    """A tiny random BERT sequence classifier over the tiny tokenizer, labels safe/unsafe."""
    tokenizer = AutoTokenizer.from_pretrained(TINY, model_max_length=512)  # as a BERT classifier's tokenizer says
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    return pipeline("text-classification", model=BertForSequenceClassification(config).eval(), tokenizer=tokenizer)


def test_any_transformers_text_classifier_plugs_into_the_text_hooks(text_classifier):
    checker = AnyMALSafetyChecker(input_text=text_classifier, unsafe_labels=["unsafe"], threshold=0.0)
    prompts = CLEAN_PROMPTS[:2]
    unsafe_scores = [next(entry["score"] for entry in scores if entry["label"] == "unsafe")
                     for scores in text_classifier(prompts, top_k=None)]
    verdicts = [checker.check_input(chat(prompt)) for prompt in prompts]
    assert [verdict.score for verdict in verdicts] == pytest.approx(unsafe_scores)  # the classifier's own scores
    bias = text_classifier.model.classifier.bias
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 20.0]))
        blocked = AnyMALSafetyChecker(input_text=ClassifierCheck(text_classifier, "unsafe")).check_input(chat("hi"))
        bias.copy_(torch.tensor([20.0, 0.0]))
        passed = AnyMALSafetyChecker(input_text=ClassifierCheck(text_classifier, "unsafe")).check_input(chat("hi"))
        bias.zero_()
    assert blocked.check == "input_text" and blocked.label == "unsafe" and blocked.score > 0.99
    assert passed is None


def test_any_transformers_image_classifier_plugs_into_the_image_hook(model, processor):
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    classifier = pipeline("image-classification", model=ViTForImageClassification(config).eval(),
                          image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    with torch.no_grad():
        classifier.model.classifier.bias.copy_(torch.tensor([0.0, 20.0]))
    checker = AnyMALSafetyChecker(input_image=classifier, unsafe_labels=["nsfw"])
    pipe = pipeline("any-to-text", model=model, processor=processor, safety_checker=checker)
    results = pipe([chat("What is it?", card()), chat("What is it?")], max_new_tokens=3, return_full_text=False)
    assert results[0][0]["safety"]["check"] == "input_image" and results[0][0]["safety"]["label"] == "nsfw"
    assert results[1][0]["safety"] is None and results[1][0]["generated_text"] != checker.refusal


class GuardTokenizer:
    """The tiny guard's tokenizer, recording the conversations the check lays out."""

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(TINY)
        self.tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {% for b in m['content'] %}"
            "{% if b['type'] == 'text' %}{{ b['text'] }}{% else %}[image]{% endif %}{% endfor %}\n{% endfor %}verdict:")
        self.conversations = []

    def apply_chat_template(self, conversation, **kwargs):
        self.conversations.append(conversation)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def forcing(self, verdict: str):
        """A `prefix_allowed_tokens_fn` that makes the guard say `verdict`, as a trained one would."""
        ids = self.tokenizer(verdict, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

        def allowed(batch, prefix):
            said = next(k for k in range(len(ids), -1, -1) if k == 0 or prefix[-k:].tolist() == ids[:k])
            return [ids[min(said, len(ids) - 1)]]

        return allowed


@pytest.fixture
def guard():
    tokenizer = GuardTokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer.tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    return model, tokenizer


def test_a_guard_llm_judges_with_its_own_chat_template(guard):
    model, tokenizer = guard
    unsafe = GuardModelCheck(model, tokenizer, prefix_allowed_tokens_fn=tokenizer.forcing("unsafe S1"))
    safe = GuardModelCheck(model, tokenizer, prefix_allowed_tokens_fn=tokenizer.forcing("safe"))
    assert unsafe([("What is it?", "A cat.", [])]) == [(1.0, "S1")]
    assert safe([("What is it?", "A cat.", [])]) == [(0.0, "safe")]
    verdict = AnyMALSafetyChecker(association=unsafe).check_association(chat("What is it?", card()), "A cat.")
    assert verdict.check == "association" and verdict.label == "S1"
    assert [message["role"] for message in tokenizer.conversations[-1]] == ["user", "assistant"]
    assert [block["type"] for block in tokenizer.conversations[-1][0]["content"]] == ["image", "text"]


def test_a_guard_llm_sees_images_and_answers_in_their_roles(guard):
    model, tokenizer = guard
    answers = GuardModelCheck(model, tokenizer, text_role="assistant",
                              prefix_allowed_tokens_fn=tokenizer.forcing("unsafe S10"))
    checker = AnyMALSafetyChecker(output_text=answers, input_image=answers)
    assert checker.run("output_text", ["Some answer."])[0].label == "S10"
    assert tokenizer.conversations[-1][-1] == {"role": "assistant", "content": [{"type": "text",
                                                                                "text": "Some answer."}]}
    assert checker.check_input(chat("hi", card())).check == "input_image"
    assert tokenizer.conversations[-1][0]["content"][0]["type"] == "image"  # the image alone, in a user turn
    with pytest.raises(ValueError, match="text_role is 'user' or 'assistant'"):
        GuardModelCheck(model, tokenizer, text_role="system")


def test_classifier_checks_see_every_label_and_take_long_texts(text_classifier):
    torch.manual_seed(0)
    labels = {index: name for index, name in enumerate(["a", "b", "c", "d", "e", "f", "nsfw"])}
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=labels, label2id={name: i for i, name in labels.items()})
    classifier = pipeline("image-classification", model=ViTForImageClassification(config).eval(),
                          image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    with torch.no_grad():
        classifier.model.classifier.bias.copy_(torch.tensor([9.0, 8, 7, 6, 5, 4, -9]))  # nsfw ranks last
    [(score, label)] = ClassifierCheck(classifier, ["nsfw"])([card()])
    assert label == "nsfw" and 0 < score < 1e-3
    long_text = " ".join(["word"] * 3000)  # beyond the classifier's 512 positions
    [(score, label)] = ClassifierCheck(text_classifier, ["unsafe"])([long_text])
    assert label == "unsafe" and 0 <= score <= 1


def test_checks_that_cannot_work_are_refused_with_the_fix(text_classifier):
    with pytest.raises(ValueError, match=r"needs unsafe_labels: which of its labels \['safe', 'unsafe'\] mean unsafe"):
        AnyMALSafetyChecker(input_text=text_classifier)
    with pytest.raises(ValueError, match=r"needs unsafe_labels"):
        ClassifierCheck(text_classifier, [])
    with pytest.raises(ValueError, match=r"threshold names unknown checks \['output'\]"):
        AnyMALSafetyChecker(output_text=lambda text: 0.0, threshold={"output": 0.5, "output_text": 0.5})
    with pytest.raises(ValueError, match="an image block needs one of 'image', 'url', 'path', 'base64'"):
        AnyMALSafetyChecker(input_image=lambda image: 0.0).check_input([{"role": "user", "content": [
            {"type": "image"}]}])
    with pytest.raises(ValueError, match=r"\['toxic'\] are not labels"):
        ClassifierCheck(text_classifier, ["toxic"])
    with pytest.raises(TypeError, match="the output_text check is a str"):
        AnyMALSafetyChecker(output_text="unitary/toxic-bert")
    with pytest.raises(ValueError, match="threshold has no entry for the check"):
        AnyMALSafetyChecker(input_text=lambda text: 0.0, output_text=lambda text: 0.0, threshold={"input_text": 0.5})
    with pytest.raises(ValueError, match="check_every must be at least 1"):
        AnyMALSafetyChecker(check_every=0)
    with pytest.raises(ValueError, match=r"returned the score nan; scores are probabilities"):
        AnyMALSafetyChecker(input_text=lambda text: float("nan")).check_input(chat("hi"))
    with pytest.raises(TypeError, match="needs the images, not their cached encoder features"):
        blocks = [{"type": "image", "image": EncoderFeatures(np.zeros((4, 8)))}, {"type": "text", "text": "hi"}]
        AnyMALSafetyChecker(input_image=lambda image: 0.0).check_input([{"role": "user", "content": blocks}])

    # without an image check, cached features in a chat are fine: images are read only for checks that need them
    assert AnyMALSafetyChecker(input_text=lambda text: 0.0).check_input([{"role": "user", "content": blocks}]) is None


def test_refusals_take_the_form_of_the_calls_outputs(model, processor, offline):
    pipe = pipeline("any-to-text", model=model, processor=processor, safety_checker=offline)
    chats = [chat(OFFENSIVE_PROMPTS[2]), chat(CLEAN_PROMPTS[0])]
    results = pipe(chats, max_new_tokens=3, do_sample=True, num_return_sequences=2, return_full_text=False)
    assert [len(records) for records in results] == [2, 2]  # one output per returned sequence, refused or not
    assert {record["generated_text"] for record in results[0]} == {offline.refusal}
    tensors = pipe(chats, max_new_tokens=3, return_tensors=True)
    assert set(tensors[0][0]) == set(tensors[1][0]) == {"input_text", "generated_token_ids", "safety"}
    assert processor.decode(tensors[0][0]["generated_token_ids"]) == offline.refusal
    with pytest.raises(ValueError, match="With a safety_checker, give a chat, a list of chats, or `text`"):
        pipe(images=card())


def test_beam_search_answers_are_checked_whole(model, processor):
    everything = AnyMALSafetyChecker(output_text=lambda text: float(bool(text.strip())))
    pipe = pipeline("any-to-text", model=model, processor=processor, safety_checker=everything)
    result = pipe(chat("Which digit?", card()), max_new_tokens=4, num_beams=2, return_full_text=False)[0]
    assert result["generated_text"] == "" and result["safety"]["check"] == "output_text"
    with pytest.raises(ValueError, match="OutputGuard follows fixed rows"):
        guard = everything.output_guard(processor.tokenizer, 3)
        guard(torch.ones(2, 4, dtype=torch.long))
        guard(torch.ones(4, 5, dtype=torch.long))


def test_with_an_association_check_a_streamer_gets_the_answer_only_once_it_passed(model, processor):
    def red(item):
        pixels = np.asarray(item[2][0]).astype(float)
        return float(pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50)

    pipe = pipeline("any-to-text", model=model, processor=processor,
                    safety_checker=AnyMALSafetyChecker(association=red))
    streamed = {}
    for color in ("red", "blue"):
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        shown = []
        reader = threading.Thread(target=shown.extend, args=(streamer,))
        reader.start()
        messages = chat("What is it?", Image.new("RGB", (32, 32), color))
        result = pipe(messages, max_new_tokens=4, streamer=streamer, return_full_text=False)[0]
        reader.join()
        streamed[color] = ("".join(shown).strip(), result)
    text, result = streamed["red"]
    assert text == "" and result["safety"]["check"] == "association"  # nothing of the flagged answer was shown
    text, result = streamed["blue"]
    assert result["safety"] is None and text and text == result["generated_text"]


def test_the_image_check_sees_arrays_as_the_processor_reads_them():
    seen = []
    checker = AnyMALSafetyChecker(input_image=lambda image: seen.append(np.asarray(image)) or 0.0)
    eight = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for image in (eight, eight.astype(np.uint16) * 257, eight.astype(np.float32) / 255, Image.fromarray(eight)):
        checker.check_input(chat("What is it?", image))
    assert all(np.array_equal(pixels, eight) for pixels in seen) and len(seen) == 4
