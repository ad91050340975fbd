"""The "any-to-text" pipeline: chats or keyword inputs of any AnyMAL modality in, generated text out."""

import numpy as np
import torch
from transformers import AutoModelForMultimodalLM, GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.any_to_any import AnyToAnyPipeline, Chat, ReturnType


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
    directly or in `generate_kwargs`. A list of chats is padded into batches of `batch_size` chats (all of them when not given) and each batch is
    generated with one `generate` call; the result holds one list of outputs per chat.
    """

    def __call__(self, text=None, images=None, videos=None, audio=None, imu=None, **kwargs):
        if isinstance(text, (list, tuple)) and (not text or any(isinstance(chat, (list, tuple)) and not chat
                                                                for chat in text)):
            raise ValueError("The pipeline got an empty chat; give a chat (a list of messages), a list of chats or "
                             "a text.")
        if imu is not None:  # reaches the processor through the preprocessing kwargs
            kwargs["imu"] = imu
        generate_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in GENERATE_ARGUMENTS}
        if generate_kwargs:  # do_sample=True, num_beams=2, streamer=... next to max_new_tokens
            kwargs["generate_kwargs"] = {**kwargs.get("generate_kwargs", {}), **generate_kwargs}
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
        records = super().postprocess(model_outputs, **postprocess_kwargs)
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


PIPELINE_REGISTRY.register_pipeline(
    "any-to-text", pipeline_class=AnyToTextPipeline, pt_model=AutoModelForMultimodalLM, type="multimodal"
)

__all__ = ["AnyToTextPipeline"]
