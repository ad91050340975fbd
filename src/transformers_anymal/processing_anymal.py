"""AnyMALProcessor: text with placeholders plus images, videos, audio and IMU recordings in; model inputs out."""

import numbers
import os
import re
from typing import TypedDict

import jinja2
import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.audio_utils import load_audio
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs, Unpack
from transformers.utils import logging

from .configuration_anymal import MODALITIES
from .feature_extraction_anymal import AnyMALIMUFeatureExtractor
from .video_processing_anymal import AnyMALVideoProcessor


logger = logging.get_logger(__name__)


# the processor argument carrying each modality's items
ARGUMENTS = {"image": "images", "video": "videos", "audio": "audio", "imu": "imu"}
# content-block keys that hold an item in chat messages, by modality
BLOCK_KEYS = {
    "image": ("image", "url", "path", "base64"),
    "video": ("video", "url", "path"),
    "audio": ("audio", "url", "path"),
    "imu": ("imu", "path"),
}
# how many array dimensions one item has
ITEM_NDIM = {"image": (2, 3), "video": (4,), "audio": (1,), "imu": (2,)}

ROLES = ("system", "user", "assistant")  # what the chat templates render
RENDER_CONTENT = (  # a message's content, its media blocks as their placeholders
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'text' -%}{{ block['text'] }}"
    "{%- elif block['type'] in ['image', 'video', 'audio', 'imu'] -%}{{ '<' ~ block['type'] ~ '>\n' }}"
    "{%- else -%}{{ raise_exception('Unknown content type ' ~ block['type'] ~ \"; use text, image, video, audio or imu\") }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
CHAT_TEMPLATE = (  # Llama-2-chat's format
    RENDER_CONTENT +
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
CHATML_TEMPLATE = (  # ChatML, the format of SmolLM2, Qwen2 and others (without a default system message)
    RENDER_CONTENT +
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


def _checked_image(image):
    """An in-memory image ready for the image processor: PIL images fully read (a truncated file fails here, by
    name), 16-bit and float images brought to the 0-255 scale the processor rescales from (`_pixels`), 2-D
    (grayscale) arrays given 3 channels; empty images refused."""
    if isinstance(image, Image.Image):  # PIL reads lazily
        image.load()
        if 0 in image.size:
            raise ValueError(f"the image is empty (size {image.size})")
        if image.mode not in ("I;16", "I;16L", "I;16B", "I", "F"):
            return image
        image = np.asarray(image)  # 16-bit PNGs (PIL reads them as "I;16" or as 32-bit "I"), or float images
        if image.dtype.kind == "i" and image.size and 0 <= image.min() and image.max() <= 65535:
            image = image.astype(np.uint16)
    image = _pixels(_as_array(image))
    shape = image.shape
    size = shape[:2] if len(shape) == 3 and shape[-1] in (1, 3, 4) else shape[-2:]
    if 0 in size:
        raise ValueError(f"the image is empty (size {tuple(size)})")
    if len(shape) == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def _frames_of(images: list) -> np.ndarray:
    """A clip given as its frames in order (image paths, URLs or PIL images), as the `(frames, height, width, 3)`
    array the video processor samples from."""
    if not images:
        raise ValueError("the list of frames is empty")
    frames = []
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            image = load_image(os.fspath(image))
        if not isinstance(image, Image.Image):
            raise TypeError(f"frame {index} is a {type(image).__name__}; give frames as image paths, URLs or PIL "
                            "images, or the whole clip as one (frames, height, width, channels) array")
        frames.append(np.asarray(_checked_image(image.convert("RGB"))))
    if len({frame.shape for frame in frames}) > 1:
        raise ValueError(f"the frames have different sizes {sorted({frame.shape[:2] for frame in frames})}; give "
                         "frames of one size")
    return np.stack(frames)


def _pixels(values: np.ndarray) -> np.ndarray:
    """Image or frame values on the 0-255 scale of 8-bit images, which the image and video processors rescale by
    1/255: uint8 as it is, uint16 divided by 257 (65535 -> 255), other integers when they lie in 0-255, floats read
    as 0-1 and multiplied by 255. Anything else is refused rather than guessed."""
    if np.iscomplexobj(values) or values.dtype == bool:
        raise TypeError(f"{values.dtype} pixel values; give uint8 (0-255), uint16 (0-65535) or float (0-1) values.")
    if values.dtype == np.uint8 or values.size == 0:
        return values
    if values.dtype == np.uint16:
        return values.astype(np.float32) / 257
    low, high = values.min(), values.max()
    if np.issubdtype(values.dtype, np.integer):
        if low < 0 or high > 255:
            raise ValueError(f"{values.dtype} pixel values span {low}..{high}; integer images are read as 0-255 (or "
                             "uint16 for 0-65535): cast or rescale them to one of those.")
        return values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError("the pixel values hold NaN or infinite values.")
    if low < 0 or high > 1:
        raise ValueError(f"float pixel values span {low:g}..{high:g}; float images are read as 0-1: divide 0-255 "
                         "values by 255 (or pass them as uint8).")
    return values.astype(np.float32) * 255


def _pcm(values: np.ndarray) -> np.ndarray:
    """A waveform as float32 in [-1, 1]: integer PCM scaled by its type's range (int16 by 32768, uint8 about 128),
    floats as they are; float samples far outside [-1, 1] (integer PCM stored as floats) are refused."""
    if np.iscomplexobj(values) or values.dtype == bool:
        raise TypeError(f"{values.dtype} samples; give float samples in [-1, 1] or integer PCM.")
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        half = (int(info.max) - int(info.min) + 1) / 2
        return ((values.astype(np.float64) - (int(info.min) + half)) / half).astype(np.float32)
    values = values.astype(np.float32)
    peak = float(np.abs(values).max()) if values.size and np.isfinite(values).all() else 0.0
    if peak > 2:  # decoders overshoot 1 a little; this far out, the samples are on another scale
        raise ValueError(f"float samples reach {peak:g}; float audio is read in [-1, 1]: divide 16-bit PCM stored as "
                         "floats by 32768 (or pass the int16 array as it is).")
    return values


_ABSENT = object()  # an attribute that was not set


class EncoderFeatures:
    """An item whose frozen-encoder features were computed earlier (feature caching): the processor expands its
    placeholder as for raw media and hands the features to the model as `encoder_features`."""

    def __init__(self, features):
        self.features = torch.as_tensor(np.asarray(features)) if not isinstance(features, torch.Tensor) else features


def _is_item(name: str, value) -> bool:
    if isinstance(value, (str, os.PathLike, EncoderFeatures)):
        return True
    if isinstance(value, dict):
        return name in ("audio", "imu")  # {"array"|"path", "sampling_rate"}, as datasets' Audio column gives
    if name == "audio" and isinstance(value, (list, tuple)) and value and all(
            isinstance(sample, numbers.Real) and not isinstance(sample, bool) for sample in value):
        return True  # a waveform as a Python list of samples
    if hasattr(value, "ndim"):  # numpy arrays and torch tensors
        return value.ndim in ITEM_NDIM[name]
    return name == "image" and hasattr(value, "convert")  # PIL images


def _as_array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


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
        **kwargs,
    ):
        self.num_tokens = {name: spec.num_tokens for name, spec in MODALITIES.items() if name in ARGUMENTS}
        self.num_tokens.update(num_tokens or {})
        # a checkpoint takes the modalities whose placeholders its tokenizer holds (an image-only one holds <image>)
        self.modalities = []
        for name in ARGUMENTS:
            token = MODALITIES[name].token
            token_id = tokenizer.convert_tokens_to_ids(token)
            present = token_id is not None and token_id != tokenizer.unk_token_id
            self.modalities += [name] * present
            setattr(self, f"{name}_token", token if present else None)  # transformers' pipelines read image_token, ...
            setattr(self, f"{name}_token_id", token_id if present else None)
        if not self.modalities:
            tokens = [MODALITIES[name].token for name in ARGUMENTS]
            raise ValueError(
                f"The tokenizer has none of the placeholders {tokens}; add those of the model's modalities with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [...]}}) and resize the model's embeddings."
            )
        super().__init__(
            image_processor, video_processor, feature_extractor, imu_feature_extractor, tokenizer,
            chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE,
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
        options = self._merge_kwargs(AnyMALProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        options["audio_kwargs"] = {key: value for key, value in options["audio_kwargs"].items()
                                   if key not in _TEXT_OPTIONS_CLAP_READS_OTHERWISE or key in kwargs.get("audio_kwargs", {})}
        if (flat_rate := options.pop("imu_sampling_rate", None)) is not None:
            if options["imu_kwargs"].get("sampling_rate", flat_rate) != flat_rate:
                raise ValueError("imu_sampling_rate was passed two times: flat and in imu_kwargs; pass it once.")
            options["imu_kwargs"]["sampling_rate"] = flat_rate
        text_kwargs = options["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        text_kwargs.pop("return_text_replacement_offsets", None)
        text_kwargs.pop("return_mm_token_type_ids", None)
        return_offsets = text_kwargs.get("return_offsets_mapping", False)

        given = {"image": images, "video": videos, "audio": audio, "imu": imu}
        data, encoder_features = {}, {}
        for name, items in given.items():
            items = self._match_items(name, items, [sample.count(MODALITIES[name].token) for sample in texts])
            cached = [isinstance(item, EncoderFeatures) for item in items]
            if any(cached) and not all(cached):
                raise ValueError(f"{name}: mix of raw items and EncoderFeatures; cache every {name} item or none.")
            if any(cached):
                encoder_features[name] = torch.stack([item.features for item in items])
            elif items:
                section = options[f"{ARGUMENTS[name]}_kwargs"]  # images_kwargs, videos_kwargs, audio_kwargs, imu_kwargs
                data[MODALITIES[name].input_name] = self._process(name, items, **section)
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
        argument, token = ARGUMENTS[name], MODALITIES[name].token
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
        elif hasattr(items, "ndim") and items.ndim != max(ITEM_NDIM[name]) + 1:
            dims = " or ".join(f"{ndim}-D" for ndim in ITEM_NDIM[name])
            raise ValueError(f"{argument}: an array of shape {tuple(items.shape)} is neither one {name} ({dims}) nor "
                             f"a stack of them ({max(ITEM_NDIM[name]) + 1}-D); see AnyMALProcessor.__call__.")
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

    def _process(self, name: str, items: list, **options):
        """`items` of modality `name` through its sub-processor with the options of its kwargs section, stacked into
        one tensor (the model takes fixed-size items)."""
        options = {**options, "return_tensors": "pt"}
        if name == "image":
            images = [self._load(name, index, load_image, os.fspath(item)) if isinstance(item, (str, os.PathLike))
                      else self._load(name, index, _checked_image, item) for index, item in enumerate(items)]
            return self.image_processor(images, **options)["pixel_values"]
        if name == "video":
            for index, item in enumerate(items):
                if hasattr(item, "ndim") and len(item) == 0:
                    raise ValueError(f"video {index}: the clip has no frames.")
            videos = [self._load(name, index, _pixels, _as_array(item)) if hasattr(item, "ndim") else os.fspath(item)
                      for index, item in enumerate(items)]
            try:
                return self.video_processor(videos, **options)["pixel_values_videos"]
            except Exception as error:
                raise ValueError(f"video: cannot decode {videos if len(videos) > 1 else videos[0]!r}: {error}") from error
        if name == "audio":
            sampling_rate = options.pop("sampling_rate", None)
            waveforms = [self._load(name, index, self._waveform, item, sampling_rate) for index, item in enumerate(items)]
            features = self.feature_extractor(waveforms, **options, sampling_rate=self.feature_extractor.sampling_rate)
            return features["input_features"]
        return self.imu_feature_extractor(items, **options)["imu_values"]

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

    def _waveform(self, item, sampling_rate: int | None) -> np.ndarray:
        """Mono float32 waveform at the feature extractor's rate, from a path or URL, a dict or an array."""
        target_rate = self.feature_extractor.sampling_rate
        if isinstance(item, dict):
            sampling_rate = item.get("sampling_rate", sampling_rate)
            item = item["array"] if "array" in item else item["path"]
        if isinstance(item, (str, os.PathLike)):  # decoded, downmixed and resampled by transformers
            item, sampling_rate = load_audio(os.fspath(item), sampling_rate=target_rate), target_rate
        waveform = _pcm(_as_array(item))
        if sampling_rate is None:
            raise ValueError(f"no sampling rate: pass sampling_rate=<Hz> (the feature extractor takes {target_rate} Hz "
                             f"and resamples from it)")
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(f"expected a non-empty mono waveform, got shape {waveform.shape}")
        if not np.isfinite(waveform).all():
            raise ValueError("the waveform holds NaN or infinite samples")
        if sampling_rate != target_rate:
            import soxr

            waveform = soxr.resample(waveform, sampling_rate, target_rate).astype(np.float32)
        window = getattr(self.feature_extractor, "fft_window_size", 1)
        if len(waveform) < window:
            raise ValueError(f"{len(waveform)} samples at {target_rate} Hz are shorter than one analysis window "
                             f"({window} samples, {1000 * window / target_rate:g} ms); give a longer clip.")
        longest = getattr(self.feature_extractor, "nb_max_samples", None)
        if getattr(self.feature_extractor, "truncation", None) == "rand_trunc" and len(waveform) > longest:
            # the feature extractor would take a random window; the middle one is the same on every call
            logger.warning_once(f"Audio of {len(waveform) / target_rate:g} s is longer than the encoder's "
                                f"{longest / target_rate:g} s window; keeping its middle.")
            start = (len(waveform) - longest) // 2
            waveform = waveform[start : start + longest]
        return waveform

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
        collected = {name: [] for name in ARGUMENTS}
        for conversation_index, conversation in enumerate(conversations):
            found = {name: [] for name in ARGUMENTS}
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
                    block_type = block.get("type")
                    if block_type == "text":
                        if not isinstance(block.get("text"), str):
                            raise ValueError(f"{where}: a text block needs a string 'text', got "
                                             f"{type(block.get('text')).__name__}.")
                        self._refuse_placeholders(block["text"], where)
                        continue
                    if block_type not in ARGUMENTS:
                        raise ValueError(
                            f"{where}: unknown content type {block_type!r}; use one of text, {', '.join(ARGUMENTS)}."
                        )
                    if block_type not in self.modalities:
                        raise ValueError(f"{where}: an item of {block_type}, but this processor's tokenizer has no "
                                         f"{MODALITIES[block_type].token} placeholder: the checkpoint takes "
                                         f"{', '.join(self.modalities)}, not {block_type}.")
                    # keys holding None are absent (datasets gives every row of a column of blocks every key)
                    values = [block[key] for key in BLOCK_KEYS[block_type] if block.get(key) is not None]
                    if len(values) != 1:
                        raise ValueError(f"{where}: a {block_type} block needs exactly one of {BLOCK_KEYS[block_type]}.")
                    item = values[0]
                    if block_type == "video" and isinstance(item, (list, tuple)):  # the clip's frames, in order
                        item = self._load("video", len(found["video"]), _frames_of, item)
                    if block_type in ("audio", "imu") and not isinstance(item, (str, os.PathLike, dict, EncoderFeatures)):
                        if "sampling_rate" not in block:
                            raise ValueError(f"{where}: a {block_type} array needs 'sampling_rate' in its block.")
                        item = {"array": item, "sampling_rate": block["sampling_rate"]}
                    elif block_type == "imu" and "sampling_rate" in block:
                        item = {"path": item, "sampling_rate": block["sampling_rate"]}
                    found[block_type].append(item)
            for name in ARGUMENTS:
                collected[name].append(found[name])
        # audio comes back as waveforms at the feature extractor's rate, the rate apply_chat_template then passes on
        audio = [[item if isinstance(item, EncoderFeatures) else self._load("audio", index, self._waveform, item, None)
                  for index, item in enumerate(sample)] for sample in collected["audio"]]
        imu = collected["imu"] if any(collected["imu"]) else None
        return collected["image"], collected["video"], audio if any(audio) else [], {"imu": imu}

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
        return ["input_ids", "attention_mask", *(MODALITIES[name].input_name for name in ARGUMENTS)]

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs):
        """Placeholder tokens per item, as serving engines (vLLM) ask to size prompts: every item of a modality takes
        `num_tokens[modality]` tokens, whatever its size or length (the projectors resample to a fixed count).

        Args:
            image_sizes (`list[list[int]]`, *optional*): (height, width) per image.
            video_sizes (`list[list[int]]`, *optional*): (frames, height, width) per video.
            audio_lengths (`list[int]`, *optional*): samples per audio clip.
        """
        data = {}
        if image_sizes is not None:
            data.update(num_image_tokens=[self.num_tokens["image"]] * len(image_sizes),
                        num_image_patches=[1] * len(image_sizes))
        if video_sizes is not None:
            data["num_video_tokens"] = [self.num_tokens["video"]] * len(video_sizes)
        if audio_lengths is not None:
            data["num_audio_tokens"] = [self.num_tokens["audio"]] * len(audio_lengths)
        return MultiModalData(**data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["AnyMALProcessor", "EncoderFeatures"]
