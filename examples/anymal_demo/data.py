"""The demo's data: real recordings that ship with the repository or its dependencies, in chat rows.

- image: the 1797 handwritten digits of `sklearn.datasets.load_digits` (8x8), drawn dark on a light 16x16 card;
- video: 8 frames of one of those digits crossing the card left, right, up or down;
- audio: `assets/spoken_digits`, the digit names spoken by espeak-ng in 30 voices (see `make_assets.py`);
- IMU: `assets/basic_motions.npz`, BasicMotions smartwatch recordings (6 channels, 10 s at 10 Hz).

Held out, never trained on: a fixed 20% of the digits (and every video made from them), 6 of the 30 voices, and
BasicMotions' own test recordings. Stage 1 reads the `align` split (captions), stage 2 the `sft` split (questions,
some over two modalities at once), evaluation the `test` (questions) and `test_captions` splits.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict


ASSETS = Path(__file__).parent / "assets"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIRECTIONS = ["left", "right", "up", "down"]
ACTIVITIES = {"Standing": "standing", "Walking": "walking", "Running": "running", "Badminton": "playing badminton"}
HELD_OUT_VOICES = ["en-us+klatt", "en-gb-scotland+m3", "en-029+f4", "en-us-nyc+f2", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd+klatt"]
IMU_SAMPLING_RATE = 10
CARD, FRAMES = 16, 8

QUESTIONS = {
    "image": ["Which digit is this?", "What digit is written here?", "Which number is shown in the picture?"],
    "video": {"digit": ["Which digit moves in this clip?", "What digit is in the video?"],
              "direction": ["Which way does the digit move?", "In which direction does the digit go?"]},
    "audio": ["Which number does the voice say?", "What number is spoken?"],
    "imu": ["What is the person doing?", "Which activity do the motion sensors show?"],
    "same": ["Is the spoken number the same as the digit in the picture?"],
    "activity_digit": ["What is the person doing, and which digit is shown?"],
}
CAPTION_PROMPTS = {"image": "Describe the image.", "video": "Describe the video.", "audio": "Describe the sound.",
                   "imu": "Describe the motion."}


def card(digit: np.ndarray, x: int = 4, y: int = 4) -> np.ndarray:
    """A 16x16 RGB card with the 8x8 digit (values 0-16) drawn dark on light, its corner at column x, row y."""
    canvas = np.full((CARD, CARD), 255, dtype=np.uint8)
    canvas[y: y + 8, x: x + 8] = 255 - np.rint(digit * 255 / 16).astype(np.uint8)
    return np.repeat(canvas[..., None], 3, axis=-1)


def moving(digit: np.ndarray, direction: str) -> np.ndarray:
    """`FRAMES` frames of the digit crossing the card: (frames, 16, 16, 3) uint8."""
    path = np.rint(np.linspace(0, CARD - 8, FRAMES)).astype(int)
    path = path[::-1] if direction in ("left", "up") else path
    positions = [(p, 4) for p in path] if direction in ("left", "right") else [(4, p) for p in path]
    return np.stack([card(digit, x, y) for x, y in positions])


def chat(blocks: list[str], question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": name} for name in blocks), {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def row(kind: str, blocks: list[str], question: str, answer: str, **media) -> dict:
    empty = {"images": [], "videos": [], "audios": [], "imus": []}
    return {"kind": kind, "messages": chat(blocks, question, answer), **empty, **media,
            "imu_sampling_rate": IMU_SAMPLING_RATE}


def augment(recordings: list[tuple], rng: np.random.Generator, copies: int = 8) -> list[tuple]:
    """More views of IMU recordings: each shifted in time (circularly) and with sensor noise added."""
    return [(np.roll(x, rng.integers(x.shape[1]), axis=1) * rng.uniform(0.8, 1.2)
             + 0.1 * x.std(1, keepdims=True) * rng.standard_normal(x.shape), label)
            for x, label in recordings for _ in range(copies)]


def load_media(seed: int = 0) -> dict:
    """Every recording with its label, split into train and held-out."""
    import soundfile
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    held_out = set(order[: len(order) // 5].tolist())
    audio = {"train": [], "test": []}
    for path in sorted((ASSETS / "spoken_digits").glob("*.flac")):
        digit, voice = path.stem.split("_", 1)
        array, rate = soundfile.read(path, dtype="float32")
        split = "test" if voice in HELD_OUT_VOICES else "train"
        audio[split].append(({"array": array, "sampling_rate": rate}, int(digit)))
    motions = np.load(ASSETS / "basic_motions.npz")
    media = {"audio": audio, "imu": {}, "image": {"train": [], "test": []}}
    for split in ("train", "test"):
        media["imu"][split] = [(x, ACTIVITIES[str(y)]) for x, y in zip(motions[f"x_{split}"], motions[f"y_{split}"])]
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        media["image"]["test" if index in held_out else "train"].append((pixels, int(label)))
    return media


def build_demo_dataset(media: dict, seed: int = 0, train_images: int | None = None,
                       videos_per_split: dict | None = None, audio_copies: int = 3, imu_copies: int = 16,
                       train_pairs: int | None = None, captions_in_sft: float = 0.25,
                       direction_share: float = 0.5) -> DatasetDict:
    """The demo's DatasetDict from `load_media`'s recordings: `align`, `sft`, `test`, `test_captions` (see the
    module docstring).

    The training splits caption and ask about `train_images` of the training digits (default: all; the pairs and
    videos draw from all), see each spoken digit `audio_copies` times and `imu_copies` noisy shifted views of each
    IMU recording, so the few recordings weigh about as much as the digits; `sft` asks about the direction in a
    `direction_share` of the training videos (the digit in the rest; held out: half each), asks `train_pairs`
    questions of each two-modality kind (default: one per training digit), and keeps a `captions_in_sft` share of the
    captions, so instruction tuning does not unlearn describing.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    videos_per_split = videos_per_split or {"train": 1600, "test": 200}

    def pick(options: list):
        return options[rng.integers(len(options))]

    splits = {"align": [], "sft": [], "test": [], "test_captions": []}

    for split in ("train", "test"):
        captions = splits["align" if split == "train" else "test_captions"]
        questions = splits["sft" if split == "train" else "test"]
        images = [(Image.fromarray(card(pixels)), label) for pixels, label in media["image"][split]]
        alone = images if split == "test" or train_images is None else [
            images[index] for index in sorted(rng.permutation(len(images))[:train_images])]
        for image, label in alone:
            captions.append(row("image", ["image"], CAPTION_PROMPTS["image"], f"a handwritten digit {DIGITS[label]}",
                                images=[image]))
            questions.append(row("image", ["image"], pick(QUESTIONS["image"]), DIGITS[label], images=[image]))
        for _ in range(videos_per_split[split]):
            pixels, label = media["image"][split][rng.integers(len(media["image"][split]))]
            direction = pick(DIRECTIONS)
            clip = moving(pixels, direction)
            captions.append(row("video", ["video"], CAPTION_PROMPTS["video"],
                                f"the digit {DIGITS[label]} moves {direction}", videos=[clip]))
            asked = "direction" if rng.random() < (direction_share if split == "train" else 0.5) else "digit"
            answer = DIGITS[label] if asked == "digit" else direction
            questions.append(row("video", ["video"], pick(QUESTIONS["video"][asked]), answer, videos=[clip]))
        for clip, label in media["audio"][split] * (audio_copies if split == "train" else 1):
            captions.append(row("audio", ["audio"], CAPTION_PROMPTS["audio"], f"a voice says {DIGITS[label]}",
                                audios=[clip]))
            questions.append(row("audio", ["audio"], pick(QUESTIONS["audio"]), DIGITS[label], audios=[clip]))
        recordings = media["imu"][split]
        if split == "train":
            recordings = augment(recordings, rng, imu_copies)
        for recording, label in recordings:
            recording = recording.astype(np.float32)
            captions.append(row("imu", ["imu"], CAPTION_PROMPTS["imu"], f"the person is {label}", imus=[recording]))
            questions.append(row("imu", ["imu"], pick(QUESTIONS["imu"]), label, imus=[recording]))

        # two modalities at once: balanced same/different digit pairs, and activity + digit
        pairs = 100 if split == "test" else len(images) if train_pairs is None else train_pairs
        for index in range(pairs):
            image, label = images[rng.integers(len(images))]
            same = index % 2 == 0
            spoken = [(clip, digit) for clip, digit in media["audio"][split] if (digit == label) == same]
            clip, said = spoken[rng.integers(len(spoken))]
            questions.append(row("pair", ["image", "audio"], pick(QUESTIONS["same"]), same_answer(label, said),
                                 images=[image], audios=[clip]))
            recording, activity = recordings[rng.integers(len(recordings))]
            questions.append(row("pair", ["imu", "image"], pick(QUESTIONS["activity_digit"]),
                                 f"{activity}, {DIGITS[label]}", images=[image], imus=[recording.astype(np.float32)]))
    splits["sft"] += [caption for caption in splits["align"] if rng.random() < captions_in_sft]
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def same_answer(shown: int, said: int) -> str:
    """The answer to "is the spoken number the digit in the picture?": both digits, then the verdict, the way a
    person would reason it out ("three and five, so no"); the verdict alone would ask the language model to
    compare two digits it never wrote down."""
    return f"{DIGITS[shown]} and {DIGITS[said]}, so {'yes' if shown == said else 'no'}"


def chance(dataset: Dataset) -> dict[str, float]:
    """Accuracy of guessing uniformly among each question's possible answers, per `kind`."""
    options = {"image": len(DIGITS), "audio": len(DIGITS), "imu": len(ACTIVITIES)}
    guesses = {}
    for kind, messages in zip(dataset["kind"], dataset["messages"]):
        question = messages[0]["content"][-1]["text"]
        if kind == "video":
            count = len(DIGITS) if question in QUESTIONS["video"]["digit"] else len(DIRECTIONS)
        elif kind == "pair":
            # "same": both digits named (the verdict follows from them); "activity_digit": activity and digit
            count = len(DIGITS) ** 2 if question in QUESTIONS["same"] else len(ACTIVITIES) * len(DIGITS)
        else:
            count = options[kind]
        guesses.setdefault(kind, []).append(Fraction(1, count))
    # exact, then rounded once: a mean of floats gives 0.10000000000000003 for ten-way questions
    return {kind: float(sum(values) / len(values)) for kind, values in guesses.items()}
