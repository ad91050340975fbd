"""Kinds of media, as transformers names input modalities (image, video, audio, time series): how one item of each is
recognised, read and checked before its modality's sub-processor runs, and how datasets' columns of it decode.

A `ModalitySpec` names its kind by `input_modality`; the processor and the collator look the kind up in `MEDIA_KINDS`
and never branch on a modality's name, so a new modality of a known kind needs no code here.
"""

import io
import numbers
import os
from functools import partial

import numpy as np
from PIL import Image
from transformers.audio_utils import load_audio
from transformers.image_utils import load_image
from transformers.utils import logging

from .audio_features_anymal import clap_log_mel


logger = logging.get_logger(__name__)


def as_array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def checked_image(image):
    """An in-memory image ready for the image processor: PIL images fully read (a truncated file fails here, by
    name), 16-bit and float images brought to the 0-255 scale the processor rescales from (`pixels`), 2-D
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
    image = pixels(as_array(image))
    shape = image.shape
    size = shape[:2] if len(shape) == 3 and shape[-1] in (1, 3, 4) else shape[-2:]
    if 0 in size:
        raise ValueError(f"the image is empty (size {tuple(size)})")
    if len(shape) == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def pixels(values: np.ndarray) -> np.ndarray:
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


def frames_of(images: list) -> np.ndarray:
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
        frames.append(np.asarray(checked_image(image.convert("RGB"))))
    if len({frame.shape for frame in frames}) > 1:
        raise ValueError(f"the frames have different sizes {sorted({frame.shape[:2] for frame in frames})}; give "
                         "frames of one size")
    return np.stack(frames)


def pcm(values: np.ndarray) -> np.ndarray:
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


class MediaKind:
    """Items of one kind of media: which values are one item, where chat blocks hold them, how they are read."""

    item_ndim: tuple[int, ...]  # array dimensions of one item
    block_sources: tuple[str, ...] = ("url", "path")  # chat-block keys that hold an item, besides the modality's name
    timed = False  # arrays need a sampling rate: `sampling_rate` in their block, or {"array", "sampling_rate"} dicts
    files_carry_rate = True  # a file of this kind says its own sampling rate

    def is_item(self, value) -> bool:
        if isinstance(value, (str, os.PathLike)):
            return True
        if isinstance(value, dict):
            return self.timed  # {"array"|"path", "sampling_rate"}, as datasets' Audio column gives
        if hasattr(value, "ndim"):  # numpy arrays and torch tensors
            return value.ndim in self.item_ndim
        return False

    def from_block(self, item):
        """A chat block's item as the processor's argument takes it."""
        return item

    def read(self, item, preprocessor, options: dict):
        """One item as `preprocessor` takes it (a file read, values checked and put on the preprocessor's scale)."""
        return item

    def preprocess(self, preprocessor, items: list, options: dict):
        """The items through their sub-processor, as the tensor the model takes."""
        return preprocessor(items, **{**options, "return_tensors": "pt"})[preprocessor.model_input_names[0]]

    def decoded(self, item):
        """An item as datasets' feature of this kind yields it, as the processor takes it."""
        return item


class ImageKind(MediaKind):
    item_ndim = (2, 3)
    block_sources = ("url", "path", "base64")

    def is_item(self, value) -> bool:
        return super().is_item(value) or hasattr(value, "convert")  # PIL images

    def read(self, item, preprocessor, options):
        return load_image(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else checked_image(item)

    def decoded(self, item):
        if isinstance(item, dict) and item.get("bytes"):  # Image(decode=False)
            return Image.open(io.BytesIO(item["bytes"]))
        if isinstance(item, dict) and item.get("path"):
            return item["path"]
        return item


class VideoKind(MediaKind):
    item_ndim = (4,)

    def is_item(self, value) -> bool:
        return super().is_item(value) or isinstance(value, bytes)  # a file's bytes, e.g. a WebDataset sample's .mp4

    def from_block(self, item):
        return frames_of(item) if isinstance(item, (list, tuple)) else item  # the clip's frames, in order

    def read(self, item, preprocessor, options):
        if isinstance(item, bytes):  # only the sampled frames decode, as from a file
            sample = partial(preprocessor.sample_frames, num_frames=options.get("num_frames"))
            frames, _ = preprocessor.fetch_videos(io.BytesIO(item), sample_indices_fn=sample)
            return pixels(frames)
        if not hasattr(item, "ndim"):
            return os.fspath(item)  # decoded by the video processor, which samples the frames it needs
        if len(item) == 0:
            raise ValueError("the clip has no frames.")
        return pixels(as_array(item))

    def preprocess(self, preprocessor, items, options):
        try:
            return super().preprocess(preprocessor, items, options)
        except Exception as error:
            raise ValueError(f"cannot decode {items if len(items) > 1 else items[0]!r}: {error}") from error

    def decoded(self, item):
        if isinstance(item, dict) and item.get("bytes"):  # Video(decode=False), WebDataset samples
            return item["bytes"]
        if isinstance(item, dict) and item.get("path"):
            return item["path"]
        if isinstance(item, list):  # frames stored as nested lists: (frames, height, width, 3)
            return np.asarray(item, dtype=np.uint8)
        return item


class AudioKind(MediaKind):
    item_ndim = (1,)
    timed = True

    def is_item(self, value) -> bool:
        return super().is_item(value) or isinstance(value, (list, tuple)) and bool(value) and all(
            isinstance(sample, numbers.Real) and not isinstance(sample, bool) for sample in value
        )  # a waveform as a Python list of samples

    def read(self, item, preprocessor, options):
        """Mono float32 waveform at the feature extractor's rate, from a path or URL, a dict or an array."""
        sampling_rate, target_rate = options.get("sampling_rate"), preprocessor.sampling_rate
        if isinstance(item, dict):
            sampling_rate = item.get("sampling_rate", sampling_rate)
            item = item["array"] if "array" in item else item["path"]
        if isinstance(item, (str, os.PathLike)):  # decoded, downmixed and resampled by transformers
            item, sampling_rate = load_audio(os.fspath(item), sampling_rate=target_rate), target_rate
        waveform = pcm(as_array(item))
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
        window = getattr(preprocessor, "fft_window_size", 1)
        if len(waveform) < window:
            raise ValueError(f"{len(waveform)} samples at {target_rate} Hz are shorter than one analysis window "
                             f"({window} samples, {1000 * window / target_rate:g} ms); give a longer clip.")
        longest = getattr(preprocessor, "nb_max_samples", None)
        if getattr(preprocessor, "truncation", None) == "rand_trunc" and len(waveform) > longest:
            # the feature extractor would take a random window; the middle one is the same on every call
            logger.warning_once(f"Audio of {len(waveform) / target_rate:g} s is longer than the encoder's "
                                f"{longest / target_rate:g} s window; keeping its middle.")
            start = (len(waveform) - longest) // 2
            waveform = waveform[start : start + longest]
        return waveform

    def preprocess(self, preprocessor, items, options):
        # read() resampled the waveforms to the feature extractor's rate
        options = {**options, "sampling_rate": preprocessor.sampling_rate, "return_tensors": "pt"}
        if (batched := clap_log_mel(preprocessor, items, options)) is not None:
            return batched
        features = preprocessor(items, **options)
        return features[preprocessor.model_input_names[0]]

    def decoded(self, item):
        if hasattr(item, "get_all_samples"):  # a torchcodec AudioDecoder (datasets `Audio` column)
            samples = item.get_all_samples()
            return {"array": samples.data.mean(0).numpy(), "sampling_rate": samples.sample_rate}
        if isinstance(item, dict) and item.get("array") is None and item.get("bytes"):  # Audio(decode=False)
            import soundfile

            array, rate = soundfile.read(io.BytesIO(item["bytes"]), dtype="float32", always_2d=True)
            return {"array": array.mean(1), "sampling_rate": rate}
        if isinstance(item, dict) and item.get("array") is None and item.get("path"):
            return item["path"]
        if isinstance(item, dict) and isinstance(item.get("array"), list):  # a plain struct column
            return {"array": np.asarray(item["array"], dtype=np.float32), "sampling_rate": item["sampling_rate"]}
        if isinstance(item, list):  # a plain list column of samples
            return np.asarray(item, dtype=np.float32)
        return item


class TimeSeriesKind(MediaKind):
    """Sensor recordings (IMU): `(channels, time)` arrays or `.npy`/`.csv` files, which do not say their rate."""

    item_ndim = (2,)
    block_sources = ("path",)
    timed = True
    files_carry_rate = False

    def decoded(self, item):
        return np.asarray(item, dtype=np.float64) if isinstance(item, list) else item


# by transformers' name of the input modality (`ModalitySpec.input_modality`)
MEDIA_KINDS: dict[str, MediaKind] = {
    "image": ImageKind(), "video": VideoKind(), "audio": AudioKind(), "time": TimeSeriesKind(),
}
