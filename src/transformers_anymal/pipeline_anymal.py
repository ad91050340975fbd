"""The "any-to-text" pipeline: chats or keyword inputs of any AnyMAL modality in, generated text out."""

import numpy as np
import torch
from transformers import AutoModelForMultimodalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.any_to_any import AnyToAnyPipeline, Chat, ReturnType

from .safety_anymal import AnyMALSafetyChecker, has_images


class ChatBatch:
    """Several chats that go through the processor and `generate` together, as one padded batch (not a list, which
    the base pipeline would run one item at a time)."""

    def __init__(self, chats: list):
        self.chats = [Chat(messages) for messages in chats]


# generate() arguments accepted directly as pipeline kwargs (max_new_tokens is already one in any-to-any)
GENERATE_ARGUMENTS = (set(GenerationConfig().to_dict()) - {"max_new_tokens"}) | {
    "streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
}


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _readable(value):
    """`value` (a chat, its content or a block) with arrays, tensors and images shown as a short description."""
    if isinstance(value, dict):
        return {key: _readable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_readable(item) for item in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"<{type(value).__name__} {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}>"
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return f"<{type(value).__name__} {value.mode} {value.size[0]}x{value.size[1]}>"
    return value


class AnyToTextPipeline(AnyToAnyPipeline):
    """
    Text generation from any mix of text, images, videos, audio and IMU recordings, with the input forms of
    transformers' `any-to-any` pipeline plus `imu=`:

    ```python
    >>> import transformers_anymal
    >>> from transformers import pipeline

    >>> pipe = pipeline("any-to-text", model="path/to/anymal")
    >>> messages = [{"role": "user", "content": [
    ...     {"type": "image", "path": "digit.png"},
    ...     {"type": "imu", "imu": recording, "sampling_rate": 100},
    ...     {"type": "text", "text": "What is the person doing?"}]}]
    >>> pipe(messages, max_new_tokens=20, return_full_text=False)
    [{'input_text': [...], 'generated_text': 'The person is running.'}]
    >>> pipe(text="<imu> What is the person doing?", imu=recording, imu_sampling_rate=100)
    ```

    Keyword `text` is the user's turn: it goes through the chat template as a chat's would, its placeholders taking
    the keyword inputs in order. Answers come back stripped; `input_text` shows media arrays and images as short
    descriptions (the full chat with the answer, `return_full_text=True`, keeps them, to continue the conversation).

    Generation options (`max_new_tokens`, `do_sample`, `temperature`, `num_beams`, `streamer`, ...) may be passed
    directly or in `generate_kwargs`. A list of chats is padded into batches of `batch_size` chats (all of them when
    not given) and each batch is generated with one `generate` call; the result holds one list of outputs per chat.

    With `safety_checker=AnyMALSafetyChecker(...)` (see `safety_anymal`), each chat's input is checked before prefill
    (a blocked chat gets the checker's refusal and is not generated; the others are), answers are checked every few
    tokens while they are generated and stopped where the check trips (a streamer only gets text that passed), and
    answers to chats with images go through the association check (a streamer then gets them once it passed). Each
    output then has `safety`: None, or the tripped check with its score and reason.
    """

    def __init__(self, *args, safety_checker: AnyMALSafetyChecker | None = None, **kwargs):
        self.safety_checker = safety_checker
        super().__init__(*args, **kwargs)

    def __call__(self, text=None, images=None, videos=None, audio=None, imu=None, **kwargs):
        if isinstance(text, (list, tuple)) and (not text or any(isinstance(chat, (list, tuple)) and not chat
                                                                for chat in text)):
            raise ValueError("The pipeline got an empty chat; give a chat (a list of messages), a list of chats or "
                             "a text.")
        generate_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in GENERATE_ARGUMENTS}
        if generate_kwargs:  # do_sample=True, num_beams=2, streamer=... next to max_new_tokens
            kwargs["generate_kwargs"] = {**kwargs.get("generate_kwargs", {}), **generate_kwargs}
        media = {"images": images, "videos": videos, "audio": audio, "imu": imu}
        specs = self.model.config.modality_specs.values()
        media.update({spec.argument: kwargs.pop(spec.argument) for spec in specs if spec.argument in kwargs})
        if self.safety_checker is not None:
            return self._checked_call(text, media, kwargs)
        return self._generate(text, **{argument: items for argument, items in media.items() if items is not None},
                              **kwargs)

    def _generate(self, text=None, images=None, videos=None, audio=None, **kwargs):
        # items of the other modalities (imu=...) reach the processor through the preprocessing kwargs
        if isinstance(text, (list, tuple)) and text and all(_is_chat(chat) for chat in text):
            batch_size = kwargs.pop("batch_size", None) or len(text)
            outputs = []
            for start in range(0, len(text), batch_size):
                records = super().__call__(ChatBatch(text[start : start + batch_size]), **kwargs)
                per_chat = len(records) // len(text[start : start + batch_size])  # num_return_sequences
                outputs += [records[i : i + per_chat] for i in range(0, len(records), per_chat)]
            return outputs
        if isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text)):
            # what any-to-any does with keyword text, less its advice to use a chat: preprocess templates the text
            inputs = {"text": text, "images": images, "videos": videos, "audio": audio}
            return super(AnyToAnyPipeline, self).__call__(inputs, **kwargs)
        return super().__call__(text, images=images, videos=videos, audio=audio, **kwargs)

    def _checked_call(self, text, media: dict, kwargs: dict):
        """`__call__` with the safety checker: inputs checked one chat (or text) at a time, the allowed ones
        generated together, refusals put back in their places, answers to chats with images checked against them."""
        checker = self.safety_checker
        single = _is_chat(text) or isinstance(text, str)
        prompts = [text] if single else list(text) if isinstance(text, (list, tuple)) else []
        if prompts and all(map(_is_chat, prompts)):  # chats
            chats, media_per_prompt = [list(chat) for chat in prompts], None
        elif prompts and all(isinstance(prompt, str) for prompt in prompts):  # keyword text, its media by placeholder
            media_per_prompt = self._media_per_text(prompts, media)
            chats = [[{"role": "user", "content": [*({"type": "image", "image": image} for image in own.get("images", [])),
                                                   {"type": "text", "text": prompt}]}]
                     for prompt, own in zip(prompts, media_per_prompt)]
        else:
            raise ValueError("With a safety_checker, give a chat, a list of chats, or `text` (with keyword media) "
                             f"to the pipeline, not {type(text).__name__}.")
        streamer = kwargs.get("generate_kwargs", {}).get("streamer")
        held = self._hold_stream_for_association(chats, streamer, kwargs)

        verdicts = [checker.check_input(chat) for chat in chats]
        allowed = [index for index, verdict in enumerate(verdicts) if verdict is None]
        outputs = {}
        if allowed and media_per_prompt is None:
            outputs = dict(zip(allowed, self._generate([chats[index] for index in allowed], **kwargs)))
        elif allowed:
            allowed_media = {argument: [own.get(argument, []) for own in map(media_per_prompt.__getitem__, allowed)]
                             for argument in media if media[argument] is not None}
            allowed_text = [prompts[index] for index in allowed]
            records = self._generate(allowed_text[0] if single else allowed_text, **allowed_media, **kwargs)
            per_prompt = len(records) // len(allowed)  # num_return_sequences
            outputs = {index: records[k * per_prompt : (k + 1) * per_prompt] for k, index in enumerate(allowed)}

        form = self._output_form(kwargs)
        results = []
        for index, (prompt, chat, verdict) in enumerate(zip(prompts, chats, verdicts)):
            if verdict is not None:
                results.append([_refused(prompt, checker.refusal, verdict, form, self.tokenizer)
                                for _ in range(form["sequences"])])
                continue
            for record in outputs[index]:
                record.setdefault("safety", None)
                answer = _answer(record, form)
                if record["safety"] is None and answer is not None:
                    association = checker.check_association(chat, answer)
                    if association is not None:
                        _set_answer(record, checker.refusal, form)
                        record["safety"] = association.to_dict()
            results.append(outputs[index])
        if held is not None:  # the answer is shown once the association check passed it
            held.replay(passed=not any(record["safety"] for records in results for record in records))
        elif not allowed and streamer is not None:
            streamer.end()  # nothing was generated: a reader of the streamer must not wait for it
        if single:
            return results[0]
        return results if media_per_prompt is None else [record for records in results for record in records]

    def _hold_stream_for_association(self, chats: list, streamer, kwargs: dict):
        """With an association check on a chat with images, a streamer gets the answer only after that check."""
        if streamer is None or "association" not in self.safety_checker.checks or not any(map(has_images, chats)):
            return None
        held = _HeldStream(streamer)
        kwargs["generate_kwargs"] = {**kwargs["generate_kwargs"], "streamer": held}
        return held

    def _output_form(self, kwargs: dict) -> dict:
        """What the outputs of this call look like, so that refusals look the same."""
        call = {key: kwargs[key] for key in ("return_full_text", "return_tensors", "return_type") if key in kwargs}
        return_type = {**self._postprocess_params, **self._sanitize_parameters(**call)[2]}.get("return_type")
        sequences = (kwargs.get("generate_kwargs", {}).get("num_return_sequences")
                     or self.model.generation_config.num_return_sequences or 1)
        return {"return_type": return_type, "sequences": sequences}

    def _media_per_text(self, texts: list[str], media: dict) -> list[dict]:
        """Keyword media split by text: checked against each text's placeholders as the processor checks them."""
        per_text = [{} for _ in texts]
        for name, spec in self.model.config.modality_specs.items():
            argument = spec.argument
            if media.get(argument) is None:
                continue
            counts = [sample.count(spec.token) for sample in texts]
            items = iter(self.processor._match_items(name, media[argument], counts))
            for sample, count in zip(per_text, counts):
                sample[argument] = [next(items) for _ in range(count)]
        return per_text

    def _forward(self, model_inputs, generate_kwargs=None):
        checker = self.safety_checker
        if checker is None or "output_text" not in checker.checks:
            return super()._forward(model_inputs, generate_kwargs)
        generate_kwargs = dict(generate_kwargs or {})
        guard = checker.output_guard(self.processor.tokenizer, model_inputs["input_ids"].shape[1],
                                     generate_kwargs.get("streamer"))
        if (generate_kwargs.get("num_beams") or self.model.generation_config.num_beams or 1) == 1:
            generate_kwargs["stopping_criteria"] = [*(generate_kwargs.get("stopping_criteria") or []), guard]
        if guard.streamer is not None:  # beam search refuses streamers itself
            generate_kwargs["streamer"] = guard.streamer
        outputs = super()._forward(model_inputs, generate_kwargs)
        sequences = outputs["generated_sequence"]
        outputs["generated_sequence"] = guard.finish(sequences.flatten(0, -2)).view_as(sequences)
        outputs["safety"] = [verdict.to_dict() if verdict is not None else None for verdict in guard.verdicts]
        return outputs

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        if isinstance(inputs, Chat) or (not isinstance(inputs, ChatBatch) and self.processor.chat_template is None):
            return super().preprocess(inputs, timeout=timeout, continue_final_message=continue_final_message,
                                      **processing_kwargs)
        if not isinstance(inputs, ChatBatch):  # keyword or plain text: the user's turn, templated as in a chat
            text = inputs if isinstance(inputs, (str, list, tuple)) else inputs["text"]
            turns = [text] if isinstance(text, str) else list(text)
            templated = [self.processor.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                                            add_generation_prompt=True) for turn in turns]
            templated = templated[0] if isinstance(text, str) else templated
            inputs = templated if isinstance(inputs, (str, list, tuple)) else {**inputs, "text": templated}
            model_inputs = super().preprocess(inputs, timeout=timeout, add_special_tokens=False, **processing_kwargs)
            model_inputs["text"] = text
            return model_inputs
        chats = inputs.chats
        if continue_final_message is None:
            continue_final_message = chats[0].messages[-1]["role"] == "assistant"
        model_inputs = self.processor.apply_chat_template(
            [chat.messages for chat in chats],
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=processing_kwargs.pop("processor_kwargs", None) or {},
            **processing_kwargs,
        ).to(dtype=self.dtype)
        model_inputs["text"] = chats
        return model_inputs

    def postprocess(self, model_outputs, **postprocess_kwargs):
        verdicts = model_outputs.pop("safety", None)
        records = super().postprocess(model_outputs, **postprocess_kwargs)
        if verdicts is not None:
            for record, verdict in zip(records, verdicts):
                record["safety"] = verdict
        for record in records:
            if "input_text" in record:
                record["input_text"] = _readable(record["input_text"])
            generated = record.get("generated_text")
            if isinstance(generated, str):  # the answer, or the prompt followed by it
                full = postprocess_kwargs.get("return_type") == ReturnType.FULL_TEXT
                record["generated_text"] = generated.rstrip() if full else generated.strip()
            elif isinstance(generated, list) and isinstance(generated[-1].get("content"), str):
                generated[-1]["content"] = generated[-1]["content"].strip()
        return records


def _prompt_before_answer(record: dict, form: dict) -> str:
    """What a text output holds before its answer: the prompt, when this call returns full texts."""
    return record["input_text"] if form["return_type"] == ReturnType.FULL_TEXT else ""


def _answer(record: dict, form: dict) -> str | None:
    """The answer of an output (None for token ids, or content blocks)."""
    generated = record.get("generated_text")
    if isinstance(generated, list):  # a chat ending in the answer
        return generated[-1]["content"] if isinstance(generated[-1].get("content"), str) else None
    return generated[len(_prompt_before_answer(record, form)):] if isinstance(generated, str) else None


def _set_answer(record: dict, answer: str, form: dict):
    if isinstance(record["generated_text"], list):
        record["generated_text"][-1]["content"] = answer
    else:
        record["generated_text"] = _prompt_before_answer(record, form) + answer


def _refused(prompt, refusal: str, verdict, form: dict, tokenizer) -> dict:
    """The output of a blocked input, in the form a generated one has in this call."""
    record = {"input_text": _readable(prompt), "safety": verdict.to_dict()}
    if form["return_type"] == ReturnType.TENSORS:
        record["generated_token_ids"] = torch.tensor(tokenizer(refusal, add_special_tokens=False)["input_ids"])
    elif form["return_type"] == ReturnType.NEW_TEXT:
        record["generated_text"] = refusal
    elif isinstance(prompt, str):
        record["generated_text"] = prompt + refusal
    else:
        record["generated_text"] = [*prompt, {"role": "assistant", "content": refusal}]
    return record


class _HeldStream(BaseStreamer):
    """Keeps what `generate` streams until `replay`: all of it when the answer passed, only the prompt if not."""

    def __init__(self, streamer: BaseStreamer):
        self.streamer, self.values = streamer, []

    def put(self, value):
        self.values.append(value)

    def end(self):
        pass

    def replay(self, passed: bool):
        for value in self.values if passed else self.values[:1]:
            self.streamer.put(value)
        self.streamer.end()


PIPELINE_REGISTRY.register_pipeline(
    "any-to-text", pipeline_class=AnyToTextPipeline, pt_model=AutoModelForMultimodalLM, type="multimodal"
)

__all__ = ["AnyToTextPipeline"]
