"""CLAP's log-mel features, vectorised over frames and clips: the same numbers as `ClapFeatureExtractor`, which
transforms each frame of each clip in a Python loop, about twice as fast (`benchmarks/bench_audio_features.py`)."""

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from transformers import ClapFeatureExtractor
from transformers.audio_utils import window_function


# options of ClapFeatureExtractor.__call__ that this path reads from the extractor itself
_OPTIONS_IT_TAKES = {"sampling_rate", "return_tensors"}
_CLIPS_AT_ONCE = 8  # 8 clips of 10 s at 48 kHz: 65 MB of float64 frames


def clap_log_mel(extractor, waveforms: list[np.ndarray], options: dict) -> torch.Tensor | None:
    """`extractor(waveforms, **options)["input_features"]`, `(clips, 1 or 4, frames, mel bins)` float32, for clips at
    the extractor's rate and no longer than its window (`nb_max_samples`); `None` where the extractor must run itself:
    another class, options this path does not read, or a clip longer than the window (the extractor takes random
    crops of it)."""
    if type(extractor) is not ClapFeatureExtractor or set(options) - _OPTIONS_IT_TAKES:
        return None
    length = extractor.nb_max_samples
    if (options.get("sampling_rate", extractor.sampling_rate) != extractor.sampling_rate
            or extractor.padding not in ("repeatpad", "repeat", "pad")
            or any(len(waveform) > length for waveform in waveforms)):
        return None
    fusion = extractor.truncation == "fusion"  # its filters are the htk ones there, the slaney ones otherwise
    filters = extractor.mel_filters if fusion else extractor.mel_filters_slaney  # (frequency bins, mel bins)
    bins = np.flatnonzero(filters.any(1))[-1] + 1  # the bins above the highest filter's are never read
    filters = np.ascontiguousarray(filters[:bins])
    window = window_function(extractor.fft_window_size, "hann")
    try:  # scipy's pocketfft runs a batch of frames about twice as fast as numpy's, to the same numbers
        from scipy.fft import rfft
    except ImportError:
        from numpy.fft import rfft
    features = []
    for start in range(0, len(waveforms), _CLIPS_AT_ONCE):
        signal = _padded(waveforms[start:start + _CLIPS_AT_ONCE], length, extractor.padding,
                         extractor.fft_window_size // 2)
        frames = sliding_window_view(signal, extractor.fft_window_size, axis=-1)[:, :: extractor.hop_length] * window
        spectrum = rfft(frames, axis=-1)[..., :bins]
        power = np.square(spectrum.real)
        power += np.square(spectrum.imag)
        mel = np.maximum(power @ filters, 1e-10)
        features.append(10.0 * np.log10(mel, out=mel))
    features = torch.from_numpy(np.concatenate(features)).float().unsqueeze(1)
    return features.expand(-1, 4, -1, -1).contiguous() if fusion else features  # fusion's 4 views of a short clip


def _padded(waveforms: list[np.ndarray], length: int, padding: str, reflected: int) -> np.ndarray:
    """`(clips, length + 2 * reflected)` float64: each clip brought to `length` samples as ClapFeatureExtractor pads
    it, repeated ("repeat"), repeated whole and then zero-padded ("repeatpad") or zero-padded ("pad"), then
    reflected `reflected` samples out at both ends, as transformers' `spectrogram` centres its frames."""
    signal = np.zeros((len(waveforms), length + 2 * reflected))
    for row, waveform in enumerate(waveforms):
        repeats = 1 if padding == "pad" else length // len(waveform) + (padding == "repeat")
        for copy in range(repeats):  # written in place: no tiled, padded or stacked copies
            begin = reflected + copy * len(waveform)
            end = min(begin + len(waveform), reflected + length)
            signal[row, begin:end] = waveform[: end - begin]
    signal[:, :reflected] = signal[:, 2 * reflected : reflected : -1]
    signal[:, -reflected:] = signal[:, -reflected - 2 : -2 * reflected - 2 : -1]
    return signal
