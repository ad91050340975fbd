"""The safety layer of the AnyMAL paper (§2.7): checks on the input text, the input images, the generated text and
the pairing of an input image with the generated text. Each check is optional and takes any classifier: a
transformers `text-classification`/`image-classification` pipeline, a guard LLM (`GuardModelCheck`), or a plain
callable that returns a score in [0, 1].

    >>> checker = AnyMALSafetyChecker(input_text=ProfanityCheck(), output_text=ProfanityCheck(),
    ...                               input_image=NudeNetCheck())   # or AnyMALSafetyChecker.offline()
    >>> pipe = pipeline("any-to-text", model="path/to/anymal", safety_checker=checker)

Input checks run before prefill: a blocked chat gets `checker.refusal` and no generation. The output check runs on
the answer every `check_every` new tokens, as a `StoppingCriteria` of `generate`, and stops that sample when it trips;
a streamer given to the pipeline (or wrapped by `output_guard`) only receives whole words that passed a check, and,
with an association check, the answer to a chat with images only after it, so unsafe text is never shown. Every
result of a checked call carries `safety`: None, or which check tripped, with its score.
"""

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline, StoppingCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.image_transforms import to_pil_image
from transformers.image_utils import load_image

from .media_anymal import checked_image
from .processing_anymal import EncoderFeatures


CHECKS = ("input_text", "input_image", "output_text", "association")
REFUSAL = "I can't help with that request."
NUDENET_UNSAFE = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
                  "ANUS_EXPOSED")


@dataclass
class SafetyVerdict:
    """A check that tripped: which one, its score, the label that scored (when the classifier names one)."""

    check: str
    score: float
    label: str | None = None

    @property
    def reason(self) -> str:
        label = f" ({self.label})" if self.label else ""
        return f"the {self.check.replace('_', ' ')} check flagged this{label} with score {self.score:.2f}"

    def to_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason}


class ClassifierCheck:
    """A transformers classification pipeline as a check: the score is the highest probability among `unsafe_labels`.
    Texts longer than the classifier's limit are truncated by its tokenizer.

        ClassifierCheck(pipeline("text-classification", model="meta-llama/Llama-Prompt-Guard-2-86M"), ["LABEL_1"])
        ClassifierCheck(pipeline("image-classification", model=...), ["nsfw"])
    """

    def __init__(self, classifier: Pipeline, unsafe_labels):
        labels = sorted(set(classifier.model.config.id2label.values()))
        if unsafe_labels is None or not len(unsafe_labels):
            raise ValueError(f"{_name(classifier)} needs unsafe_labels: which of its labels {labels} mean unsafe.")
        self.unsafe_labels = [unsafe_labels] if isinstance(unsafe_labels, str) else list(unsafe_labels)
        unknown = [label for label in self.unsafe_labels if label not in labels]
        if unknown:
            raise ValueError(f"unsafe_labels {unknown} are not labels of {_name(classifier)}; its labels are {labels}: "
                             "name the ones that mean unsafe.")
        self.classifier, self.num_labels = classifier, len(labels)
        self.options = {"truncation": True} if classifier.task == "text-classification" else {}

    def __call__(self, items: list) -> list[tuple[float, str]]:
        results = self.classifier(items, top_k=self.num_labels, **self.options)  # every label's probability
        scores = []
        for result in results:
            unsafe = [entry for entry in result if entry["label"] in self.unsafe_labels]
            best = max(unsafe, key=lambda entry: entry["score"], default={"score": 0.0, "label": None})
            scores.append((float(best["score"]), best["label"]))
        return scores


def _name(classifier: Pipeline) -> str:
    return classifier.model.config.name_or_path or type(classifier.model).__name__


class GuardModelCheck:
    """A guard LLM (Llama Guard 3/4, Qwen3Guard, ShieldGemma, ...) as a check, with its own chat template as the
    policy prompt. Items are judged as the guard's template lays them out: a text (input or output check) as a turn
    of `text_role` ("user" for prompts; "assistant" to judge answers as responses), an image (input image check) as
    a user turn holding it (a vision guard such as Llama Guard 4, with its processor), and `(prompt, answer,
    images)` (association check) as the user's prompt and images followed by the assistant's answer. The score is 1
    when the guard's verdict starts with `unsafe_prefix`, and the label is the rest of it (e.g. the category, "S1").

        GuardModelCheck(AutoModelForCausalLM.from_pretrained("meta-llama/Llama-Guard-3-1B"), tokenizer)
    """

    def __init__(self, model, processor, unsafe_prefix: str = "unsafe", text_role: str = "user",
                 max_new_tokens: int = 10, **generate_kwargs):
        if text_role not in ("user", "assistant"):
            raise ValueError(f"text_role is 'user' or 'assistant', got {text_role!r}.")
        self.model, self.processor, self.unsafe_prefix, self.text_role = model, processor, unsafe_prefix, text_role
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}

    def __call__(self, items: list) -> list[tuple[float, str]]:
        return [self._judge(self._conversation(item)) for item in items]

    def _conversation(self, item) -> list[dict]:
        def turn(role, text, images=()):
            return {"role": role, "content": [*({"type": "image", "image": image} for image in images),
                                              *([{"type": "text", "text": text}] if text or not images else [])]}

        if isinstance(item, str):
            return [turn("user", ""), turn("assistant", item)] if self.text_role == "assistant" else [turn("user", item)]
        if isinstance(item, Image.Image):
            return [turn("user", "", [item])]
        prompt, answer, images = item
        return [turn("user", prompt, images), turn("assistant", answer)]

    def _judge(self, conversation: list[dict]) -> tuple[float, str]:
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                    add_generation_prompt=True, return_tensors="pt")
        with torch.inference_mode():
            generated = self.model.generate(**inputs.to(self.model.device), **self.generate_kwargs)
        verdict = self.processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        flagged = verdict.lower().startswith(self.unsafe_prefix)
        return float(flagged), (verdict[len(self.unsafe_prefix):].strip() or self.unsafe_prefix) if flagged else verdict


class ProfanityCheck:
    """The offline text default: `alt-profanity-check`'s linear SVM over TF-IDF features (an offensive-language
    classifier trained on tweets, 1 MB, shipped inside its wheel; `pip install transformers-anymal[safety]`)."""

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError as error:
            raise ImportError("ProfanityCheck needs `pip install transformers-anymal[safety]` (alt-profanity-check).") from error
        self.predict_prob = predict_prob

    def __call__(self, texts: list[str]) -> list[tuple[float, str]]:
        return [(float(score), "offensive") for score in self.predict_prob(texts)]


class NudeNetCheck:
    """The offline image default: NudeNet's ONNX detector (12 MB, shipped inside its wheel; `pip install
    transformers-anymal[safety]`). The score is its highest confidence for an exposed intimate body part."""

    def __init__(self, unsafe_classes=NUDENET_UNSAFE):
        try:
            from nudenet import NudeDetector
        except ImportError as error:
            raise ImportError("NudeNetCheck needs `pip install transformers-anymal[safety]` (nudenet).") from error
        self.detector, self.unsafe_classes = NudeDetector(), tuple(unsafe_classes)

    def __call__(self, images: list[Image.Image]) -> list[tuple[float, str | None]]:
        scores = []
        for image in images:  # NudeNet reads RGBA arrays as OpenCV orders them
            hits = self.detector.detect(np.asarray(image.convert("RGBA")))
            found = [hit for hit in hits if hit["class"] in self.unsafe_classes]
            best = max(found, key=lambda hit: hit["score"], default={"score": 0.0, "class": None})
            scores.append((float(best["score"]), best["class"]))
        return scores


class AnyMALSafetyChecker:
    """One optional check per front of the paper's safety layer. Each takes a batch (a list) of items and returns one
    `(score, label)` per item (scores in [0, 1]); a `text-classification`/`image-classification` pipeline is wrapped in
    `ClassifierCheck` with `unsafe_labels`, and a callable of one item returning a float, a bool or `(score, label)`
    works too. The items are: `input_text`, each user message's text; `input_image`, each image of the user's turns
    (a PIL image); `output_text`, the answer so far; `association`, `(prompt, answer, images)` for chats with images.

    Args:
        threshold: a score at or above it trips the check; a dict gives each check its own.
        check_every: the output check runs after every this many new tokens (and at the end).
        unsafe_labels: the labels that mean unsafe, for checks given as pipelines.
        refusal: the answer of a blocked chat.
    """

    def __init__(self, input_text=None, input_image=None, output_text=None, association=None, *,
                 threshold: float | dict = 0.5, check_every: int = 8, unsafe_labels=None, refusal: str = REFUSAL):
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}.")
        given = {"input_text": input_text, "input_image": input_image, "output_text": output_text,
                 "association": association}
        self.checks = {name: _as_check(name, check, unsafe_labels) for name, check in given.items() if check is not None}
        if isinstance(threshold, dict) and set(threshold) - set(CHECKS):
            raise ValueError(f"threshold names unknown checks {sorted(set(threshold) - set(CHECKS))}; the checks are "
                             f"{', '.join(CHECKS)}.")
        self.thresholds = {name: threshold[name] if isinstance(threshold, dict) else threshold
                           for name in self.checks if not isinstance(threshold, dict) or name in threshold}
        missing = [name for name in self.checks if name not in self.thresholds]
        if missing:
            raise ValueError(f"threshold has no entry for the check(s) {missing}; give one per check, or one float.")
        self.check_every, self.refusal = check_every, refusal

    @classmethod
    def offline(cls, **kwargs) -> "AnyMALSafetyChecker":
        """Input and output text checked by `ProfanityCheck`, input images by `NudeNetCheck`: classifiers that
        ship inside their wheels, for tests and demos. In production plug in guard models (see the README)."""
        text = ProfanityCheck()
        return cls(input_text=text, input_image=NudeNetCheck(), output_text=text, **kwargs)

    def run(self, name: str, items: list) -> list[SafetyVerdict | None]:
        """`name`'s check on each item: a verdict where it trips, else None (also when that check is not set)."""
        if name not in self.checks or not items:
            return [None] * len(items)
        results = self.checks[name](items)
        if len(results) != len(items):
            raise ValueError(f"the {name} check returned {len(results)} results for {len(items)} items.")
        verdicts = []
        for result in results:
            score, label = _score_and_label(name, result)
            verdicts.append(SafetyVerdict(name, score, label) if score >= self.thresholds[name] else None)
        return verdicts

    def check_input(self, messages: list[dict]) -> SafetyVerdict | None:
        """The first tripped input check of a chat: the text of each user message, then each image in them."""
        texts = [text for text in map(_text_of, _user_turns(messages)) if text]
        verdict = next((verdict for verdict in self.run("input_text", texts) if verdict is not None), None)
        if verdict is None and "input_image" in self.checks:  # images are read only for a check that needs them
            verdict = next((verdict for verdict in self.run("input_image", images_of(messages))
                            if verdict is not None), None)
        return verdict

    def check_association(self, messages: list[dict], answer: str) -> SafetyVerdict | None:
        """The association check on the chat's user images with the answer; None for chats without images."""
        if "association" not in self.checks or not has_images(messages):
            return None
        prompt = next((_text_of(message) for message in reversed(_user_turns(messages))), "")
        return self.run("association", [(prompt, answer, images_of(messages))])[0]

    def output_guard(self, tokenizer, prompt_length: int, streamer: BaseStreamer | None = None) -> "OutputGuard":
        """A `StoppingCriteria` that runs the output check every `check_every` tokens; pass it (and its `streamer`,
        which holds text back until it is checked) to `generate`, then let `finish` check the rest:

            guard = checker.output_guard(processor.tokenizer, inputs["input_ids"].shape[1], TextIteratorStreamer(...))
            generated = guard.finish(model.generate(**inputs, stopping_criteria=[guard], streamer=guard.streamer))
            guard.verdicts  # per row: None, or the SafetyVerdict that stopped it

        Greedy decoding and sampling only: beam search re-sorts its rows every step (check its results with
        `finish` alone, which then removes a flagged answer whole).
        """
        return OutputGuard(self, tokenizer, prompt_length, streamer)


class OutputGuard(StoppingCriteria):
    """Stops each sample whose answer so far trips the output check; the rows of `finish(sequences)` keep only the
    tokens that passed (the rest become padding, as after an end-of-sequence token)."""

    def __init__(self, checker: AnyMALSafetyChecker, tokenizer, prompt_length: int, streamer=None):
        self.checker, self.tokenizer, self.prompt_length = checker, tokenizer, prompt_length
        self.verdicts: list[SafetyVerdict | None] = []
        self.passed: list[int] = []  # per row: how many generated tokens passed a check
        self.checked = 0  # generated tokens at the last check
        self.finished = False  # `finish` has checked every token: unflagged rows may be shown whole
        self.sequences = None
        self.streamer = _HeldBackStreamer(self, streamer) if streamer is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if not self.verdicts:
            self.verdicts, self.passed = [None] * len(input_ids), [0] * len(input_ids)
        if len(input_ids) != len(self.verdicts):
            raise ValueError("OutputGuard follows fixed rows (greedy decoding or sampling); with beam search, check "
                             "the results with guard.finish(sequences) instead of passing it as a stopping criterion.")
        self.sequences = input_ids
        if input_ids.shape[1] - self.prompt_length - self.checked >= self.checker.check_every:
            self._check(input_ids)
        return torch.tensor([verdict is not None for verdict in self.verdicts], device=input_ids.device)

    def finish(self, sequences: torch.LongTensor | None = None) -> torch.LongTensor | None:
        """Checks what came after the last check, and pads each tripped row after its last passed token."""
        sequences = self.sequences if sequences is None else sequences
        if sequences is None:
            return None
        if len(sequences) != len(self.verdicts):  # beam search returns other rows than it checked: judge the results
            self.verdicts, self.passed = [None] * len(sequences), [0] * len(sequences)
        self._check(sequences)
        self.finished = True
        sequences = sequences.clone()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for row, verdict in enumerate(self.verdicts):
            if verdict is not None:
                sequences[row, self.prompt_length + self.kept(row, sequences):] = pad
        return sequences

    def kept(self, row: int, sequences: torch.LongTensor) -> int:
        """How many generated tokens of `row` may be shown: all of them once `finish` passed the row, else those that
        passed a check up to the last word boundary (a word may go on, or turn out flagged, in the next tokens)."""
        answer = sequences[row, self.prompt_length:].tolist()
        if self.finished and self.verdicts[row] is None:
            return len(answer)
        end = self.passed[row]
        while end > 0 and not self._starts_word(answer, end):
            end -= 1
        return end

    def _starts_word(self, answer: list[int], index: int) -> bool:
        """Whether token `index` of `answer` begins a new word (its text starts with white space)."""
        if index >= len(answer):
            return False
        before = self.tokenizer.decode(answer[:index], skip_special_tokens=True)
        return self.tokenizer.decode(answer[: index + 1], skip_special_tokens=True)[len(before):][:1].isspace()

    def _check(self, sequences: torch.LongTensor):
        generated = self.checked = sequences.shape[1] - self.prompt_length
        rows = [row for row, verdict in enumerate(self.verdicts) if verdict is None and self.passed[row] < generated]
        texts = self.tokenizer.batch_decode(sequences[rows, self.prompt_length:], skip_special_tokens=True)
        for row, verdict in zip(rows, self.checker.run("output_text", texts)):
            if verdict is None:
                self.passed[row] = generated
            else:
                self.verdicts[row] = verdict


class _HeldBackStreamer(BaseStreamer):
    """Passes the prompt on at once and each answer token only once the output check has passed it."""

    def __init__(self, guard: OutputGuard, streamer: BaseStreamer):
        self.guard, self.streamer, self.released, self.prompt_seen = guard, streamer, 0, False
        self.seen_passed = 0  # the guard's passed count at the last release

    def put(self, value):
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            self.streamer.put(value)
        elif self.guard.passed and self.guard.passed[0] > self.seen_passed:  # a check passed more tokens
            self._release()

    def end(self):
        self.guard.finish()
        self._release()
        self.streamer.end()

    def _release(self):
        guard = self.guard
        if guard.sequences is None or not guard.passed:
            return
        self.seen_passed = guard.passed[0]
        kept = guard.kept(0, guard.sequences)
        if kept > self.released:
            start = guard.prompt_length + self.released
            self.streamer.put(guard.sequences[0, start : guard.prompt_length + kept].cpu())
            self.released = kept


def _as_check(name: str, check, unsafe_labels):
    if isinstance(check, Pipeline):
        return ClassifierCheck(check, unsafe_labels)
    if isinstance(check, BATCHED_CHECKS):
        return check
    if callable(check):
        return _batched(check)
    raise TypeError(f"the {name} check is a {type(check).__name__}; give a transformers pipeline, one of "
                    f"{', '.join(cls.__name__ for cls in BATCHED_CHECKS)}, or a callable returning a score in [0, 1].")


BATCHED_CHECKS = (ClassifierCheck, GuardModelCheck, ProfanityCheck, NudeNetCheck)  # these take a list of items


def _batched(check):
    """A callable of one item as a callable of a list of items."""
    def batched(items: list) -> list:
        return [check(item) for item in items]

    return batched


def _score_and_label(name: str, result) -> tuple[float, str | None]:
    score, label = result if isinstance(result, tuple) else (result, None)
    score = float(score)
    if not 0.0 <= score <= 1.0:  # NaN included
        raise ValueError(f"the {name} check returned the score {score}; scores are probabilities in [0, 1].")
    return score, label


def _user_turns(messages: list[dict]) -> list[dict]:
    return [message for message in messages if message.get("role") == "user"]


def _image_blocks(messages: list[dict]) -> list[dict]:
    return [block for message in _user_turns(messages) for block in _blocks(message) if block.get("type") == "image"]


def has_images(messages: list[dict]) -> bool:
    """Whether the chat's user turns hold images (what the association check looks at)."""
    return bool(_image_blocks(messages))


def images_of(messages: list[dict]) -> list[Image.Image]:
    """The images of the chat's user turns, read."""
    return [_as_pil(block) for block in _image_blocks(messages)]


def _blocks(message: dict) -> list[dict]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return " ".join(block["text"] for block in _blocks(message) if block.get("type") == "text")


def _as_pil(block: dict) -> Image.Image:
    value = next((block[key] for key in ("image", "url", "path", "base64") if block.get(key) is not None), None)
    if value is None:
        raise ValueError("an image block needs one of 'image', 'url', 'path', 'base64'.")
    if isinstance(value, EncoderFeatures):
        raise TypeError("The input_image check needs the images, not their cached encoder features: check the images "
                        "before caching, or leave input_image unset for cached rows.")
    if isinstance(value, (str, os.PathLike)):
        return load_image(os.fspath(value))  # a path, URL or base64 string, as the processor reads it
    image = checked_image(value)  # arrays and 16-bit or float images on the 0-255 scale, as the processor reads them
    return image if isinstance(image, Image.Image) else to_pil_image(np.rint(image).astype(np.uint8))


__all__ = ["AnyMALSafetyChecker", "ClassifierCheck", "GuardModelCheck", "NudeNetCheck", "OutputGuard",
           "ProfanityCheck", "SafetyVerdict"]
