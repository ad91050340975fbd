"""Evaluation metrics for AnyMAL outputs: captions (BLEU-4, ROUGE-L, CIDEr-D, as COCO's caption evaluation computes
them), VQAv2 accuracy with the official answer normalisation, and multiple-choice accuracy.

Caption metrics take already tokenized text (words separated by spaces); `tokenize` lowercases and drops
punctuation, close to COCO's PTB tokenizer without its Java dependency.
"""

import math
import re
from collections import Counter, defaultdict
from itertools import combinations


def tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 with the closest reference length, as COCO's `Bleu(4)` reports it."""
    matches, totals, hypothesis_length, reference_length = [0] * 4, [0] * 4, 0, 0
    for prediction, refs in zip(predictions, references, strict=True):
        words, ref_words = prediction.split(), [ref.split() for ref in refs]
        hypothesis_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
        for n in range(1, 5):
            counts = _ngrams(words, n)
            best = Counter()
            for ref in ref_words:
                best |= _ngrams(ref, n)
            matches[n - 1] += sum(min(count, best[ngram]) for ngram, count in counts.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    tiny = 1e-9  # COCO's smoothing of empty counts
    log_precision = sum(math.log((m + tiny) / (t + tiny)) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hypothesis_length > reference_length else math.exp(1 - reference_length / max(hypothesis_length, tiny))
    return brevity * math.exp(log_precision)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, word_a in enumerate(a, 1):
        for j, word_b in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if word_a == word_b else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def rouge_l(predictions: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score (beta 1.2), best precision and recall over the references, as COCO's `Rouge`."""
    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        words = prediction.split()
        precisions, recalls = [], []
        for ref in refs:
            lcs = _lcs(ref.split(), words)
            precisions.append(lcs / max(len(words), 1))
            recalls.append(lcs / max(len(ref.split()), 1))
        precision, recall = max(precisions), max(recalls)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall else 0.0)
    return sum(scores) / len(scores)


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: TF-IDF n-gram cosine similarity with clipping and a Gaussian length penalty, x10, as COCO's `Cider`."""
    cooked = [[sum((_ngrams(ref.split(), k) for k in range(1, n + 1)), Counter()) for ref in refs] for refs in references]
    document_frequency = Counter(ngram for refs in cooked for ngram in set().union(*refs))
    log_images = math.log(len(references))

    def vector(counts):
        vec, norm, length = [defaultdict(float) for _ in range(n)], [0.0] * n, 0
        for ngram, count in counts.items():
            order = len(ngram) - 1
            vec[order][ngram] = count * (log_images - math.log(max(1.0, document_frequency[ngram])))
            norm[order] += vec[order][ngram] ** 2
            length += count if order == 1 else 0  # COCO's quirk: the length is the number of bigrams
        return vec, [math.sqrt(value) for value in norm], length

    scores = []
    for prediction, refs in zip(predictions, cooked, strict=True):
        hyp, hyp_norm, hyp_length = vector(sum((_ngrams(prediction.split(), k) for k in range(1, n + 1)), Counter()))
        total = [0.0] * n
        for ref in refs:
            ref_vec, ref_norm, ref_length = vector(ref)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = sum(min(weight, ref_vec[order][ngram]) * ref_vec[order][ngram]
                            for ngram, weight in hyp[order].items())
                if hyp_norm[order] and ref_norm[order]:
                    value /= hyp_norm[order] * ref_norm[order]
                total[order] += value * penalty
        scores.append(10.0 * sum(total) / n / len(refs))
    return sum(scores) / len(scores)


CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def normalize_answer(answer: str) -> str:
    """VQAv2's answer normalisation: punctuation, periods, number words, articles and contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for mark in PUNCTUATION:
        if (mark + " " in answer or " " + mark in answer) or re.search(r"(\d)(,)(\d)", answer) is not None:
            answer = answer.replace(mark, "")
        else:
            answer = answer.replace(mark, " ")
    answer = re.sub(r"(?!<=\d)(\.)(?!\d)", "", answer)
    words = [NUMBERS.get(word, word) for word in answer.split() if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy: min(matching humans / 3, 1), averaged over the leave-one-out subsets of the answers."""
    prediction, answers = normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    if len(answers) == 1:
        return float(prediction == answers[0])
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == prediction for i in subset) / 3, 1.0) for subset in subsets) / len(subsets)


def multiple_choice_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to their answer after VQA normalisation."""
    pairs = list(zip(predictions, answers, strict=True))
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in pairs) / len(pairs)


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4, ROUGE-L and CIDEr-D of raw captions, tokenized here."""
    predictions = [tokenize(prediction) for prediction in predictions]
    references = [[tokenize(ref) for ref in refs] for refs in references]
    return {"bleu4": bleu4(predictions, references), "rouge_l": rouge_l(predictions, references),
            "cider_d": cider_d(predictions, references)}


__all__ = ["bleu4", "caption_metrics", "cider_d", "multiple_choice_accuracy", "normalize_answer", "rouge_l",
           "tokenize", "vqa_accuracy"]
