"""AnyMALProcessor: text with placeholders plus items of every registered modality in; model inputs out."""

import os
import re
from typing import TypedDict

import jinja2
import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import MultiModalData, ProcessingKwargs, Unpack
from transformers.utils import logging

from .configuration_anymal import MODALITIES, recorded_modalities, register_recorded_modalities
from .feature_extraction_anymal import AnyMALIMUFeatureExtractor
from .media_anymal import MEDIA_KINDS, MediaKind
from .video_processing_anymal import AnyMALVideoProcessor


logger = logging.get_logger(__name__)


ROLES = ("system", "user", "assistant")  # what the chat templates render


def _render_content(modalities: list[str]) -> str:
    """Jinja macro rendering a message's content: text as it is, each media block of `modalities` as its placeholder."""
    placeholders = "{" + ", ".join(f"{name!r}: {MODALITIES[name].token!r}" for name in modalities) + "}"
    types = ", ".join(["text", *modalities])
    return (
        "{%- macro render(content) -%}"
        f"{{%- set placeholders = {placeholders} -%}}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for block in content -%}"
        "{%- if block['type'] == 'text' -%}{{ block['text'] }}"
        "{%- elif block['type'] in placeholders -%}{{ placeholders[block['type']] ~ '\n' }}"
        f"{{%- else -%}}{{{{ raise_exception('Unknown content type ' ~ block['type'] ~ '; use {types}') }}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def llama2_chat_template(modalities: list[str]) -> str:
    """Llama-2-chat's format, with media blocks of `modalities` rendered as their placeholders."""
    return (
        _render_content(modalities) +
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system_message = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ bos_token ~ '[INST] ' }}"
        "{%- if loop.first and system_message is not none -%}{{ '<<SYS>>\n' ~ system_message ~ '\n<</SYS>>\n\n' }}{%- endif -%}"
        "{{ render(message['content']) | trim ~ ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        # the space before the answer is part of it: tokenizers merge it into the answer's first token
        "{%- generation -%}{{ ' ' ~ render(message['content']) | trim ~ ' ' ~ eos_token }}{%- endgeneration -%}"
        "{%- elif message['role'] == 'system' -%}"
        "{{ raise_exception('A system message goes first in a Llama-2-chat prompt; move it to the start of the chat') }}"
        "{%- else -%}{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def chatml_chat_template(modalities: list[str]) -> str:
    """ChatML, the format of SmolLM2, Qwen2 and others (without a default system message), with media blocks of
    `modalities` rendered as their placeholders."""
    return (
        _render_content(modalities) +
        "{%- for message in messages -%}"
        "{%- if message['role'] in ['system', 'user'] -%}"
        "{{ '<|im_start|>' ~ message['role'] ~ '\n' ~ render(message['content']) | trim ~ '<|im_end|>\n' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\n' }}"
        "{%- generation -%}{{ render(message['content']) | trim ~ '<|im_end|>' }}{%- endgeneration -%}{{ '\n' }}"
        "{%- else -%}{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


_ABSENT = object()  # an attribute that was not set


BFLOAT16_BITS = np.uint16  # the dtype that holds bfloat16 features in a cache (examples/cache_features.py)


class EncoderFeatures:
    """An item whose frozen-encoder features were computed earlier (feature caching): the processor expands its
    placeholder as for raw media and hands the features to the model as `encoder_features`."""

    def __init__(self, features):
        if not isinstance(features, torch.Tensor):
            features = np.asarray(features)
            # numpy and parquet have no bfloat16: caches keep its bit patterns as uint16
            bits = features.dtype == BFLOAT16_BITS
            features = torch.as_tensor(features.view(np.int16) if bits else features)
            features = features.view(torch.bfloat16) if bits else features
        self.features = features


def media_kind(name: str) -> MediaKind:
    """How items of modality `name` are recognised and read: the media kind its spec names."""
    return MEDIA_KINDS[MODALITIES[name].input_modality]


def _section(name: str) -> str:
    """The processor kwargs section of a modality's options: images_kwargs, videos_kwargs, audio_kwargs, imu_kwargs."""
    return f"{MODALITIES[name].argument}_kwargs"


def _is_item(name: str, value) -> bool:
    return isinstance(value, EncoderFeatures) or media_kind(name).is_item(value)


class AnyMALIMUKwargs(TypedDict, total=False):
    """Options of the IMU feature extractor, passed to the processor as `imu_kwargs={...}`."""

    sampling_rate: int | None
    channels_first: bool | None


class AnyMALProcessorKwargs(ProcessingKwargs, total=False):
    """The processor's keyword arguments, routed as in every transformers processor: `text_kwargs`, `images_kwargs`,
    `videos_kwargs`, `audio_kwargs` and `imu_kwargs` sections, or flat keywords that go to every section that takes
    them (`rescale_factor=` to images and videos, `padding=` to the tokenizer, `sampling_rate=` to audio)."""

    imu_kwargs: AnyMALIMUKwargs
    imu_sampling_rate: int | None  # flat form of imu_kwargs={"sampling_rate": ...}


# options of every section that also name a CLAP feature-extractor option with another meaning (padding="repeatpad",
# not True): the audio section takes them only from `audio_kwargs=` itself, never from a flat keyword meant for text
_TEXT_OPTIONS_CLAP_READS_OTHERWISE = ("padding", "max_length", "truncation", "pad_to_multiple_of", "return_attention_mask")


class AnyMALProcessor(ProcessorMixin):
    r"""
    Prepares inputs for [`AnyMALForConditionalGeneration`]: each placeholder (`<image>`, `<video>`, `<audio>`,
    `<imu>`) in the text marks one item and becomes the run of `num_tokens[modality]` tokens that the model fills with
    the item's projected features.

    Items may be given flat (in the order their placeholders appear across the batch) or as one list per sample, in
    which case every sample is checked on its own. Items given for a text without their placeholders raise a
    `ValueError`: write the placeholder where the item belongs, or use [`~AnyMALProcessor.apply_chat_template`].

    Args:
        image_processor ([`CLIPImageProcessor`]): preprocesses images.
        video_processor ([`AnyMALVideoProcessor`]): samples and preprocesses video frames.
        feature_extractor ([`ClapFeatureExtractor`]): turns audio into CLAP's log-mel features.
        imu_feature_extractor ([`AnyMALIMUFeatureExtractor`]): resamples, normalises and windows IMU recordings.
        tokenizer ([`PreTrainedTokenizerFast`]): holds, as added tokens, the placeholders of the modalities the
            checkpoint takes (`processor.modalities`); items of the others are refused by name.
        chat_template (`str`, *optional*): Jinja template; Llama-2-chat style by default.
        num_tokens (`dict[str, int]`, *optional*): placeholder tokens per item, as `AnyMALConfig.num_tokens`.
    """

    def __init__(
        self,
        image_processor=None,
        video_processor=None,
        feature_extractor=None,
        imu_feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        num_tokens: dict[str, int] | None = None,
        added_modalities: dict[str, dict] | None = None,
        **kwargs,
    ):
        register_recorded_modalities(added_modalities)
        # a checkpoint takes the modalities whose placeholders its tokenizer holds (an image-only one holds <image>)
        self.modalities = []
        for name, spec in MODALITIES.items():
            token_id = tokenizer.convert_tokens_to_ids(spec.token)
            present = token_id is not None and token_id != tokenizer.unk_token_id
            self.modalities += [name] * present
            setattr(self, f"{name}_token", spec.token if present else None)  # transformers' pipelines read image_token
            setattr(self, f"{name}_token_id", token_id if present else None)
        if not self.modalities:
            tokens = [spec.token for spec in MODALITIES.values()]
            raise ValueError(
                f"The tokenizer has none of the placeholders {tokens}; add those of the model's modalities with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [...]}}) and resize the model's embeddings."
            )
        self.num_tokens = {name: (num_tokens or {}).get(name, MODALITIES[name].num_tokens) for name in self.modalities}
        self.added_modalities = recorded_modalities(self.modalities)
        super().__init__(
            image_processor, video_processor, feature_extractor, imu_feature_extractor, tokenizer,
            chat_template=chat_template if chat_template is not None else llama2_chat_template(self.modalities),
        )

    valid_processor_kwargs = AnyMALProcessorKwargs
    # defaults under everything else, the tokenizer's own init options included: a batch comes padded to its longest
    text_kwargs = {"padding": True}
    imu_kwargs = {}

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        videos=None,
        audio=None,
        imu=None,
        **kwargs: Unpack[AnyMALProcessorKwargs],
    ) -> BatchFeature:
        """
        Args:
            text: one string or a batch of strings holding one placeholder per item.
            images: PIL images, arrays, paths or URLs.
            videos: video file paths or URLs, or frame arrays `(frames, height, width, channels)`.
            audio: waveforms (with `sampling_rate`), `{"array", "sampling_rate"}` dicts, or audio file paths.
            imu: `(channels, time)` or `(time, channels)` arrays (with `imu_sampling_rate`), dicts
                `{"array"|"path", "sampling_rate"}`, or `.npy`/`.csv` paths.
            kwargs: as for every transformers processor ([`AnyMALProcessorKwargs`]): `return_tensors` (`"pt"`, `"np"`
                or None for lists of token ids, media as tensors), tokenizer options (`padding`, `padding_side`,
                `max_length`, ...), `sampling_rate` of the audio arrays (resampled to the feature extractor's),
                `imu_sampling_rate` of the IMU arrays, video options (`num_frames`, `fps`), image and video options
                (`rescale_factor`, `do_normalize`, ...), flat or in `text_kwargs`, `images_kwargs`, `videos_kwargs`,
                `audio_kwargs` and `imu_kwargs`.
        """
        if text is None:
            raise ValueError("AnyMALProcessor needs `text`, with one placeholder such as <image> per item.")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        for index, sample in enumerate(texts):
            try:
                sample.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate, e.g. from text decoded with errors="surrogateescape"
                raise ValueError(f"text {index}: {sample[error.start:error.end]!r} at position {error.start} is not "
                                 "valid Unicode; decode the text with errors='replace' or drop it.") from error
        given = {"images": images, "videos": videos, "audio": audio, "imu": imu}
        given.update({spec.argument: kwargs.pop(spec.argument) for spec in MODALITIES.values() if spec.argument in kwargs})
        # kwargs sections of added modalities (`<argument>_kwargs`), which transformers' merging does not know
        # (they take options only there, not as flat keywords)
        sections = {section: dict(kwargs.pop(section, {})) for section in map(_section, MODALITIES)
                    if section not in AnyMALProcessorKwargs.__annotations__}
        flat_rates = {name: kwargs.pop(f"{MODALITIES[name].argument}_sampling_rate", None) for name in MODALITIES
                      if media_kind(name).timed}  # imu_sampling_rate=..., the flat form of imu_kwargs={"sampling_rate": ...}
        options = self._merge_kwargs(AnyMALProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        options.update(sections)
        options["audio_kwargs"] = {key: value for key, value in options["audio_kwargs"].items()
                                   if key not in _TEXT_OPTIONS_CLAP_READS_OTHERWISE or key in kwargs.get("audio_kwargs", {})}
        for name, rate in flat_rates.items():
            section = options[_section(name)]
            if rate is not None and section.get("sampling_rate", rate) != rate:
                raise ValueError(f"{MODALITIES[name].argument}_sampling_rate was passed two times: flat and in "
                                 f"{_section(name)}; pass it once.")
            if rate is not None:
                section["sampling_rate"] = rate
        text_kwargs = options["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        text_kwargs.pop("return_text_replacement_offsets", None)
        text_kwargs.pop("return_mm_token_type_ids", None)
        return_offsets = text_kwargs.get("return_offsets_mapping", False)

        data, encoder_features = {}, {}
        for name, spec in MODALITIES.items():
            items = self._match_items(name, given.get(spec.argument), [sample.count(spec.token) for sample in texts])
            cached = [isinstance(item, EncoderFeatures) for item in items]
            if any(cached) and not all(cached):
                raise ValueError(f"{name}: mix of raw items and EncoderFeatures; cache every {name} item or none.")
            if any(cached):
                encoder_features[name] = torch.stack([item.features for item in items])
            elif items:
                data[spec.input_name] = self._process(name, items, options[_section(name)])
        texts, offsets = self._expand_placeholders(texts)
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **text_kwargs)
        output = BatchFeature({**text_inputs, **data}, tensor_type=return_tensors)
        if return_offsets:  # apply_chat_template realigns the assistant mask with them
            output["text_replacement_offsets"] = offsets
        if encoder_features:
            output["encoder_features"] = encoder_features
        return output

    def _match_items(self, name: str, items, counts: list[int]) -> list:
        """Flattens `items` in placeholder order after checking them against the placeholders of every sample."""
        argument, token = MODALITIES[name].argument, MODALITIES[name].token
        none_given = items is None or (isinstance(items, (list, tuple)) and not any(
            item is not None and (not isinstance(item, (list, tuple)) or item) for item in items))
        if name not in self.modalities:  # without its placeholder token, "<audio>" in a text is plain text
            if not none_given:
                raise ValueError(f"{argument} were given, but this processor's tokenizer has no {token} placeholder: "
                                 f"the checkpoint takes {', '.join(self.modalities)}, not {name}.")
            return []
        if none_given:
            if any(counts):
                sample = next(i for i, count in enumerate(counts) if count)
                raise ValueError(f"sample {sample} has {counts[sample]} {token} placeholder(s) but no {argument} were given.")
            return []
        if _is_item(name, items):
            items = [items]
        elif hasattr(items, "ndim") and items.ndim != max(item_ndim := media_kind(name).item_ndim) + 1:
            dims = " or ".join(f"{ndim}-D" for ndim in item_ndim)
            raise ValueError(f"{argument}: an array of shape {tuple(items.shape)} is neither one {name} ({dims}) nor "
                             f"a stack of them ({max(item_ndim) + 1}-D); see AnyMALProcessor.__call__.")
        per_sample = all(isinstance(item, (list, tuple)) and not _is_item(name, item) for item in items)
        if per_sample:  # one list per sample
            if len(items) != len(counts):
                raise ValueError(f"{argument} has {len(items)} per-sample lists but there are {len(counts)} texts.")
            for sample, (sample_items, count) in enumerate(zip(items, counts)):
                if len(sample_items) != count:
                    raise ValueError(
                        f"sample {sample} has {count} {token} placeholder(s) but {len(sample_items)} {argument} were "
                        f"given for it; write one {token} where each item belongs."
                    )
            items = [item for sample_items in items for item in sample_items]
        elif len(items) != sum(counts):
            where = f"sample {counts.index(max(counts))}" if len(counts) == 1 else f"the texts ({counts} per sample)"
            hint = (f"write one {token} where each item belongs" if not any(counts)
                    else f"give {argument} as one list per sample to have each sample checked")
            raise ValueError(f"{where} hold {sum(counts)} {token} placeholder(s) but {len(items)} {argument} were given; {hint}.")
        for index, item in enumerate(items):
            if not _is_item(name, item):
                raise TypeError(
                    f"{name} {index}: {type(item).__name__} is not a {name} input; see AnyMALProcessor.__call__."
                )
            values = item.get("array") if isinstance(item, dict) else item
            if hasattr(values, "dtype") and np.iscomplexobj(values):
                raise TypeError(f"{name} {index}: complex values; give the real signal (np.real, or np.abs for "
                                "magnitudes).")
        return list(items)

    def _process(self, name: str, items: list, options: dict):
        """`items` of modality `name`, read as their kind of media, through the modality's preprocessing with the
        options of its kwargs section, stacked into one tensor (the model takes fixed-size items)."""
        preprocess = MODALITIES[name].preprocess
        if callable(preprocess):
            return preprocess(items, **options)
        if preprocess is None:
            raise ValueError(
                f"{name}: the {name} modality was registered from a saved config, which cannot record its preprocessing "
                f"function; run the same register_modality({name!r}, ModalitySpec(..., preprocess=...)) first."
            )
        kind, preprocessor = media_kind(name), getattr(self, preprocess)
        items = [self._load(name, index, kind.read, item, preprocessor, options) for index, item in enumerate(items)]
        try:
            return kind.preprocess(preprocessor, items, options)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {error}") from error

    @staticmethod
    def _load(name: str, index: int, loader, *args):
        try:
            return loader(*args)
        except TypeError as error:
            raise TypeError(f"{name} {index}: {error}") from error
        except Exception as error:
            source = args[0]
            if isinstance(source, (str, os.PathLike, Image.Image)):  # a file, or a lazily read one
                where = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
                raise ValueError(f"{name} {index}: cannot read {where!r}: {error}") from error
            raise ValueError(f"{name} {index}: {error}") from error

    def _expand_placeholders(self, texts: list[str]) -> tuple[list[str], list[list[dict]]]:
        """Replaces each placeholder with its run of tokens; the offsets say where each run went."""
        tokens = {MODALITIES[name].token: name for name in self.modalities}
        pattern = re.compile("|".join(re.escape(token) for token in tokens))
        expanded, offsets = [], []
        for text in texts:
            pieces, sample_offsets, last, shift = [], [], 0, 0
            for match in pattern.finditer(text):
                replacement = match.group() * self.num_tokens[tokens[match.group()]]
                pieces += [text[last : match.start()], replacement]
                new_start = match.start() + shift
                sample_offsets.append({"type": tokens[match.group()], "span": match.span(),
                                       "new_span": (new_start, new_start + len(replacement)),
                                       "text": match.group(), "replacement": replacement})
                shift += len(replacement) - len(match.group())
                last = match.end()
            expanded.append("".join(pieces) + text[last:])
            offsets.append(sample_offsets)
        return expanded, offsets

    def apply_chat_template(self, conversation, *args, **kwargs):
        if isinstance(conversation, (list, tuple)) and not conversation:  # transformers would fail on an index
            raise ValueError("apply_chat_template got no messages; give a chat (a list of messages) or a list of chats.")
        try:
            return super().apply_chat_template(conversation, *args, **kwargs)
        except jinja2.TemplateError as error:  # raise_exception(...) in the template: a chat it cannot render
            raise ValueError(f"The chat template cannot render this chat: {error}") from error

    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        """Collects every modality's items from chat content blocks, one list per conversation."""
        collected = {name: [] for name in MODALITIES}
        for conversation_index, conversation in enumerate(conversations):
            found = {name: [] for name in MODALITIES}
            if not conversation:
                raise ValueError(f"conversation {conversation_index} has no messages.")
            for message_index, message in enumerate(conversation):
                if not isinstance(message, dict) or message.get("role") not in ROLES:
                    role = message.get("role") if isinstance(message, dict) else None
                    raise ValueError(f"conversation {conversation_index}, message {message_index}: role {role!r}; "
                                     f"this template takes {', '.join(ROLES)} messages.")
                content = message.get("content")
                if content is None:  # the template would render it as the word "None", or as nothing
                    raise ValueError(f"conversation {conversation_index}, message {message_index}: no `content` (or "
                                     "None); give a string or a list of content blocks.")
                if isinstance(content, str):
                    self._refuse_placeholders(content, f"conversation {conversation_index}, message {message_index}")
                    continue
                for block_index, block in enumerate(content):
                    where = f"conversation {conversation_index}, message {message_index}, block {block_index}"
                    if not isinstance(block, dict):
                        raise TypeError(f"{where}: a content block is a dict such as {{'type': 'text', 'text': ...}}, "
                                        f"got {type(block).__name__} {block!r:.40}.")
                    if block.get("type") == "text":
                        if not isinstance(block.get("text"), str):
                            raise ValueError(f"{where}: a text block needs a string 'text', got "
                                             f"{type(block.get('text')).__name__}.")
                        self._refuse_placeholders(block["text"], where)
                        continue
                    name = self._modality_of(block, where)
                    found[name].append(self._block_item(name, block, where, len(found[name])))
            for name in MODALITIES:
                collected[name].append(found[name])
        arguments = {}
        for name, per_conversation in collected.items():
            argument = MODALITIES[name].argument
            if argument == "audio" and any(per_conversation):
                # transformers' apply_chat_template tells the processor that audio comes at the feature extractor's
                # rate: read the waveforms (resampled to it) here
                preprocessor = getattr(self, MODALITIES[name].preprocess)
                per_conversation = [
                    [item if isinstance(item, EncoderFeatures)
                     else self._load(name, index, media_kind(name).read, item, preprocessor, {}) for index, item in enumerate(sample)]
                    for sample in per_conversation
                ]
            arguments[argument] = per_conversation if any(per_conversation) else None
        images, videos, audio = (arguments.pop(argument) for argument in ("images", "videos", "audio"))
        return images or [], videos or [], audio or [], arguments

    def _modality_of(self, block: dict, where: str) -> str:
        """The modality of a media block, checked against what this processor serves."""
        name = block.get("type")
        if name not in MODALITIES:
            raise ValueError(f"{where}: unknown content type {name!r}; use one of text, {', '.join(self.modalities)}.")
        if name not in self.modalities:
            raise ValueError(f"{where}: an item of {name}, but this processor's tokenizer has no "
                             f"{MODALITIES[name].token} placeholder: the checkpoint takes "
                             f"{', '.join(self.modalities)}, not {name}.")
        return name

    def _block_item(self, name: str, block: dict, where: str, index: int):
        """The item a media block holds, as the processor's argument for `name` takes it."""
        kind = media_kind(name)
        keys = (name, *kind.block_sources)
        # keys holding None are absent (datasets gives every row of a column of blocks every key)
        values = [block[key] for key in keys if block.get(key) is not None]
        if len(values) != 1:
            raise ValueError(f"{where}: a {name} block needs exactly one of {keys}.")
        item = self._load(name, index, kind.from_block, values[0])
        if kind.timed and not isinstance(item, (str, os.PathLike, dict, EncoderFeatures)):
            if "sampling_rate" not in block:
                raise ValueError(f"{where}: a {name} array needs 'sampling_rate' in its block.")
            return {"array": item, "sampling_rate": block["sampling_rate"]}
        if kind.timed and not kind.files_carry_rate and "sampling_rate" in block:
            return {"path": item, "sampling_rate": block["sampling_rate"]}
        return item

    def _refuse_placeholders(self, text: str, where: str):
        """In a chat, only media blocks make media slots: a placeholder typed in the text would take an item's place."""
        typed = [MODALITIES[name].token for name in self.modalities if MODALITIES[name].token in text]
        if typed:
            raise ValueError(f"{where}: the text holds {typed[0]}, the placeholder of a media slot, which text cannot "
                             f"make; give the item as a {{'type': '{typed[0][1:-1]}', ...}} block, or write the text "
                             "another way.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            raise OSError(
                f"Cannot load an AnyMALProcessor from {str(pretrained_model_name_or_path)!r}: it needs "
                f"processor_config.json, the tokenizer files and chat_template.jinja. Save them with "
                f"processor.save_pretrained(...) next to the model, or build the checkpoint with "
                f"examples/build_anymal.py. ({error})"
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As [`ProcessorMixin.save_pretrained`]; the `auto_map` written for `trust_remote_code` goes into the saved
        files only, not into this processor and its sub-processors (whose `to_dict()` stays as it was)."""
        parts = [self, *(value for value in vars(self).values() if hasattr(value, "save_pretrained"))]
        before = [(part, part.__dict__.get("auto_map", _ABSENT)) for part in parts]
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for part, auto_map in before:
                if auto_map is _ABSENT:
                    part.__dict__.pop("auto_map", None)
                else:
                    part.auto_map = auto_map

    @staticmethod
    def get_possibly_dynamic_module(module_name):
        # the sub-processors defined here resolve without Auto-class registration (and trust_remote_code works)
        local = {cls.__name__: cls for cls in (AnyMALIMUFeatureExtractor, AnyMALVideoProcessor)}
        return local.get(module_name) or ProcessorMixin.get_possibly_dynamic_module(module_name)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(MODALITIES[name].input_name for name in self.modalities)]

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs):
        """Placeholder tokens per item, as serving engines (vLLM) ask to size prompts: every item of a modality takes
        `num_tokens[modality]` tokens, whatever its size or length (the projectors resample to a fixed count).

        Args:
            image_sizes (`list[list[int]]`, *optional*): (height, width) per image.
            video_sizes (`list[list[int]]`, *optional*): (frames, height, width) per video.
            audio_lengths (`list[int]`, *optional*): samples per audio clip.
        """
        def tokens_per_item(argument: str, items: list) -> list[int]:
            [name] = [name for name, spec in MODALITIES.items() if spec.argument == argument]
            if name not in self.modalities:
                raise ValueError(f"{argument} sizes were given, but this processor takes {', '.join(self.modalities)}, "
                                 f"not {name}.")
            return [self.num_tokens[name]] * len(items)

        data = {}
        if image_sizes is not None:
            data.update(num_image_tokens=tokens_per_item("images", image_sizes), num_image_patches=[1] * len(image_sizes))
        if video_sizes is not None:
            data["num_video_tokens"] = tokens_per_item("videos", video_sizes)
        if audio_lengths is not None:
            data["num_audio_tokens"] = tokens_per_item("audio", audio_lengths)
        return MultiModalData(**data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["AnyMALProcessor", "EncoderFeatures"]
