"""The main job's data: each answer says what its media show, in the shares `build_demo_dataset` is asked for. The
main job's own test sees these only through accuracies after half an hour of training; these take seconds."""

import re
import sys
from collections import Counter

import numpy as np
import pytest

from anymal_tester import TINY


sys.path.insert(0, str(TINY.parents[1] / "examples"))
from anymal_demo import data  # noqa: E402


@pytest.fixture(scope="module")
def media():
    return data.load_media(0)


@pytest.fixture(scope="module")
def dataset(media):
    return data.build_demo_dataset(media, 0, train_images=50, videos_per_split={"train": 300, "test": 200},
                                   audio_copies=1, imu_copies=1, train_pairs=60, direction_share=2 / 3)


def answer(row: dict) -> str:
    return row["messages"][-1]["content"][0]["text"]


def question(row: dict) -> str:
    return row["messages"][0]["content"][-1]["text"]


def test_same_answer_names_both_digits_then_the_verdict():
    assert data.same_answer(3, 5) == "three and five, so no"
    assert data.same_answer(7, 7) == "seven and seven, so yes"


@pytest.fixture(scope="module")
def labels(media) -> dict:
    """What each recording is, keyed by its bytes: digit images (and every first frame a clip can start from), spoken
    digits, and the held-out IMU recordings (training views of those are shifted and noisy)."""
    images = {data.card(pixels, x, y).tobytes(): data.DIGITS[label] for split in ("train", "test")
              for pixels, label in media["image"][split] for x, y in ((4, 4), (0, 4), (8, 4), (4, 0), (4, 8))}
    audio = {np.asarray(clip["array"], dtype=np.float32).tobytes(): data.DIGITS[label]
             for split in ("train", "test") for clip, label in media["audio"][split]}
    imu = {recording.astype(np.float32).tobytes(): activity for recording, activity in media["imu"]["test"]}
    return {"image": images, "audio": audio, "imu": imu}


def test_every_answer_names_what_its_media_show(dataset, labels):
    shown = lambda row: labels["image"][np.asarray(row["images"][0].convert("RGB")).tobytes()]  # noqa: E731
    said = lambda row: labels["audio"][np.asarray(row["audios"][0]["array"], dtype=np.float32).tobytes()]  # noqa: E731
    checked = Counter()
    for split in ("sft", "test"):
        for row in dataset[split]:
            kind, asked, reply = row["kind"], question(row), answer(row)
            if asked in data.CAPTION_PROMPTS.values():
                continue
            if kind == "image":
                assert reply == shown(row)
            elif kind == "audio":
                assert reply == said(row)
            elif kind == "video" and asked in data.QUESTIONS["video"]["digit"]:
                first = np.asarray(row["videos"][0][0], dtype=np.uint8)
                assert reply == labels["image"][first.tobytes()]
            elif kind == "imu":
                recording = np.asarray(row["imus"][0], dtype=np.float32)
                assert reply == labels["imu"][recording.tobytes()] if split == "test" else (
                    reply in data.ACTIVITIES.values())
            elif kind == "pair" and asked in data.QUESTIONS["same"]:
                digit, spoken, verdict = re.fullmatch(r"(\w+) and (\w+), so (yes|no)", reply).groups()
                assert (digit, spoken, verdict) == (shown(row), said(row), "yes" if digit == spoken else "no")
                checked["same " + verdict] += 1
            elif kind == "pair":
                activity, digit = reply.rsplit(", ", 1)
                assert digit == shown(row) and activity in data.ACTIVITIES.values()
            checked[kind] += 1
    assert checked["same yes"] == checked["same no"] == (60 + 100) // 2  # half the pairs show the digit said
    assert min(checked[kind] for kind in ("image", "video", "audio", "imu", "pair")) > 30, checked


def moved(frames: np.ndarray) -> str:
    """Which way the dark pixels' centre goes from the first frame to the last."""
    def centre(frame):
        rows, columns = np.nonzero(frame[..., 0] < 128)
        return columns.mean(), rows.mean()

    (x0, y0), (x1, y1) = centre(frames[0]), centre(frames[-1])
    if abs(x1 - x0) > abs(y1 - y0):
        return "right" if x1 > x0 else "left"
    return "down" if y1 > y0 else "up"


def test_video_questions_ask_the_direction_in_the_share_asked_for_and_answer_it(dataset):
    for split, share in (("sft", 2 / 3), ("test", 1 / 2)):
        videos = [row for row in dataset[split]
                  if row["kind"] == "video" and question(row) != data.CAPTION_PROMPTS["video"]]  # sft keeps some captions
        about_direction = [row for row in videos if question(row) in data.QUESTIONS["video"]["direction"]]
        assert len(videos) == (300 if split == "sft" else 200)
        assert abs(len(about_direction) / len(videos) - share) < 0.08, (split, len(about_direction))
        for row in about_direction:
            assert answer(row) == moved(np.asarray(row["videos"][0], dtype=np.uint8)), question(row)


def test_chance_is_one_over_each_questions_possible_answers(dataset):
    rows = dataset["test"]
    odds = data.chance(rows)
    assert odds["image"] == odds["audio"] == 0.1 and odds["imu"] == 0.25
    direction = np.mean([question(row) in data.QUESTIONS["video"]["direction"] for row in rows if row["kind"] == "video"])
    assert odds["video"] == pytest.approx(direction / 4 + (1 - direction) / 10)
    assert odds["pair"] == pytest.approx((1 / 100 + 1 / 40) / 2)  # as many "same" as activity-and-digit questions
