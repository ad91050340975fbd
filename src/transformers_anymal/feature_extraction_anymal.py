"""Feature extractor for IMU recordings: load, check, resample, normalise and window accelerometer + gyroscope data."""

import os

import numpy as np
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)


def load_imu(path: str | os.PathLike) -> np.ndarray:
    """Reads a `.npy` array or a `.csv` table (one column per channel, an optional header row) as float64."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if path.endswith(".npy"):
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    if path.endswith(".csv"):
        try:
            return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError:  # a header row
            return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=1)
    raise ValueError(f"{path!r} is neither .npy nor .csv; save IMU recordings as one of those.")


class AnyMALIMUFeatureExtractor(FeatureExtractionMixin):
    r"""
    Turns IMU recordings into `imu_values` of shape `(num_recordings, num_channels, window_length)`.

    Each recording is resampled to `sampling_rate`, normalised per channel (with the fixed `mean`/`std` when given,
    otherwise by each recording's own statistics), then centre-cropped (with a warning) or zero-padded to
    `window_length` steps; `return_attention_mask=True` adds `imu_mask`, 1 on real steps.

    Layout rule: a 2-D array is `(channels, time)` when its first dimension equals `num_channels`, otherwise
    `(time, channels)` when its last one does; pass `channels_first` to decide explicitly.

    Args:
        num_channels (`int`, *optional*, defaults to 6): accelerometer x/y/z then gyroscope x/y/z.
        sampling_rate (`int`, *optional*, defaults to 200): rate the encoder expects, in Hz.
        window_length (`int`, *optional*, defaults to 1000): time steps per window (5 s at 200 Hz).
        min_duration (`float`, *optional*, defaults to 1.0): shortest recording accepted, in seconds.
        mean (`list[float]`, *optional*): per-channel mean of the training data.
        std (`list[float]`, *optional*): per-channel standard deviation of the training data.
    """

    model_input_names = ["imu_values"]

    def __init__(
        self,
        num_channels: int = 6,
        sampling_rate: int = 200,
        window_length: int = 1000,
        min_duration: float = 1.0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.sampling_rate = sampling_rate
        self.window_length = window_length
        self.min_duration = min_duration
        self.mean = mean
        self.std = std
        for name, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != num_channels:
                raise ValueError(f"{name} has {len(stats)} values but num_channels is {num_channels}.")

    def __call__(
        self,
        recordings,
        sampling_rate: int | None = None,
        channels_first: bool | None = None,
        return_attention_mask: bool = False,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """`recordings`: one or a list of arrays, `.npy`/`.csv` paths, or dicts `{"array"|"path", "sampling_rate"}`."""
        if isinstance(recordings, (str, os.PathLike, dict)) or getattr(recordings, "ndim", 0) == 2:
            recordings = [recordings]
        windows, masks = [], []
        for index, recording in enumerate(recordings):
            try:
                window, mask = self._window(recording, sampling_rate, channels_first)
            except TypeError as error:
                raise TypeError(f"imu {index}: {error}") from error
            except (ValueError, OSError) as error:
                raise ValueError(f"imu {index}: {error}") from error
            windows.append(window)
            masks.append(mask)
        data = {"imu_values": np.stack(windows).astype(np.float32)}
        if return_attention_mask:
            data["imu_mask"] = np.stack(masks)
        return BatchFeature(data, tensor_type=return_tensors)

    def _window(self, recording, sampling_rate, channels_first) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(recording, dict):
            sampling_rate = recording.get("sampling_rate", sampling_rate)
            recording = recording["array"] if "array" in recording else recording.get("path")
        if isinstance(recording, (str, os.PathLike)):
            recording = load_imu(recording)
        if hasattr(recording, "numpy"):  # torch tensors
            recording = recording.detach().cpu().numpy()
        if not isinstance(recording, np.ndarray) and not isinstance(recording, (list, tuple)):
            raise TypeError(f"expected an array, a .npy/.csv path or a dict, got {type(recording).__name__}")
        if np.iscomplexobj(recording):
            raise TypeError("complex values; give the real signal (np.real, or np.abs for magnitudes).")
        values = np.asarray(recording, dtype=np.float64)
        if sampling_rate is None:
            raise ValueError(
                "no sampling rate: pass imu_sampling_rate=<Hz> (or {'array': ..., 'sampling_rate': <Hz>}); "
                "a wrong rate would silently stretch the motion in time."
            )
        values = self.time_major(values, channels_first)  # (time, channels)
        if not np.isfinite(values).all():
            bad_steps = np.flatnonzero(~np.isfinite(values).all(1))
            raise ValueError(
                f"{len(bad_steps)} time steps hold NaN or infinite values (first at step {bad_steps[0]}); "
                "interpolate the gaps or drop the recording."
            )
        if len(values) < self.min_duration * sampling_rate:
            raise ValueError(
                f"{len(values)} samples at {sampling_rate} Hz last {len(values) / sampling_rate:g} s, shorter than "
                f"the {self.min_duration:g} s minimum; use a longer recording."
            )
        if sampling_rate != self.sampling_rate:
            import soxr

            values = soxr.resample(values, sampling_rate, self.sampling_rate)
        mean = np.asarray(self.mean) if self.mean is not None else values.mean(0)
        std = np.asarray(self.std) if self.std is not None else values.std(0)
        values = (values - mean) / np.maximum(std, 1e-6)

        length = len(values)
        if length > self.window_length:
            start = (length - self.window_length) // 2
            logger.warning_once(
                f"IMU recording of {length / self.sampling_rate:g} s is longer than the "
                f"{self.window_length / self.sampling_rate:g} s window; keeping its middle."
            )
            values, length = values[start : start + self.window_length], self.window_length
        window = np.zeros((self.window_length, self.num_channels))
        window[:length] = values
        mask = np.zeros(self.window_length, dtype=np.int64)
        mask[:length] = 1
        return window.T, mask  # (channels, window_length)

    def time_major(self, values: np.ndarray, channels_first: bool | None = None) -> np.ndarray:
        """`values` as `(time, channels)`, by the layout rule of the class docstring; a `ValueError` when no
        dimension has the encoder's channel count."""
        if values.ndim != 2:
            raise ValueError(f"expected a 2-D (channels, time) or (time, channels) array, got shape {values.shape}")
        if channels_first is None:
            channels_first = values.shape[0] == self.num_channels
            if not channels_first and values.shape[1] != self.num_channels:
                raise ValueError(
                    f"shape {values.shape} has no dimension of {self.num_channels} channels; the encoder takes "
                    f"{self.num_channels} channels (accelerometer x/y/z, gyroscope x/y/z)."
                )
        values = values.T if channels_first else values
        if values.shape[1] != self.num_channels:
            raise ValueError(f"{values.shape[1]} channels but the encoder takes {self.num_channels}.")
        return values


__all__ = ["AnyMALIMUFeatureExtractor", "load_imu"]
