"""The caption metrics agree with COCO's reference implementation (pycocoevalcap) on the same tokenized inputs."""

import pytest

from transformers_anymal.metrics_anymal import (
    bleu4,
    caption_metrics,
    cider_d,
    multiple_choice_accuracy,
    normalize_answer,
    rouge_l,
    tokenize,
    vqa_accuracy,
)


PREDICTIONS = ["a handwritten digit seven", "the digit three moves to the left", "a person is running fast",
               "a voice says nine", "two dogs play in the snow with a ball"]
REFERENCES = [["a handwritten digit seven", "the number seven written by hand"],
              ["the digit three moves left", "a three moving to the left", "digit 3 slides left"],
              ["the person is running", "someone runs"],
              ["a voice says nine", "the spoken number is nine", "nine is said"],
              ["a dog plays in snow", "two dogs playing with a ball in the snow"]]


@pytest.fixture(scope="module")
def coco():
    pycocoevalcap = pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    assert pycocoevalcap
    gts = {i: refs for i, refs in enumerate(REFERENCES)}
    res = {i: [prediction] for i, prediction in enumerate(PREDICTIONS)}
    return {"cider": Cider().compute_score(gts, res)[0], "rouge": Rouge().compute_score(gts, res)[0],
            "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3]}


def test_cider_d_matches_pycocoevalcap(coco):
    assert abs(cider_d(PREDICTIONS, REFERENCES) - coco["cider"]) < 1e-6


def test_rouge_l_and_bleu4_match_pycocoevalcap(coco):
    assert abs(rouge_l(PREDICTIONS, REFERENCES) - coco["rouge"]) < 1e-6
    assert abs(bleu4(PREDICTIONS, REFERENCES) - coco["bleu4"]) < 1e-6


def test_perfect_captions_score_higher_than_wrong_ones():
    references = [[reference] for reference in ["a digit seven", "a person running", "a voice says two"]]
    perfect = caption_metrics([r[0] for r in references], references)
    wrong = caption_metrics(["a cat sleeping", "the sky is blue", "nothing here"], references)
    assert perfect["bleu4"] > 0.99 and perfect["rouge_l"] > 0.99 and all(perfect[k] > wrong[k] for k in perfect)


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("Two dogs.") == "2 dogs" and normalize_answer("The cat!") == "cat"
    assert tokenize("The Digit, three!") == "the digit three"
    humans = ["yes"] * 3 + ["no"] * 7
    # leaving out one of the 3 "yes" leaves 2 matches (2/3), leaving out a "no" leaves 3 (1): (3 * 2/3 + 7) / 10
    assert vqa_accuracy("Yes", humans) == pytest.approx(0.9)
    assert vqa_accuracy("no", humans) == 1.0 and vqa_accuracy("maybe", humans) == 0.0
    assert multiple_choice_accuracy(["Seven", "running", "a cat"], ["7", "Running.", "dog"]) == pytest.approx(2 / 3)
