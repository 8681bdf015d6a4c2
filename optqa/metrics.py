"""SQuAD's answer metrics: token F1 and exact match after SQuAD v1.1's normalisation, best over the gold answers.

Source: Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text", and its official
evaluation script (v1.1), which ARC-DA's leaderboard uses too. Scores are percentages (0-100).
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, squeeze white space (SQuAD v1.1's evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if ``prediction`` and ``gold`` are equal after ``normalize_answer``, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 of ``prediction`` against ``gold`` after ``normalize_answer`` (SQuAD v1.1): the harmonic mean of
    token precision and recall over the multiset of shared tokens; 1.0 when both are empty.

    Returns:
        A number in [0, 1].
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Iterable[str]) -> tuple[float, float]:
    """(F1, EM) against the best-matching gold answer; ARC-DA lists 1-15 acceptable answers."""
    golds = list(golds)
    return (max(token_f1(prediction, g) for g in golds), max(exact_match(prediction, g) for g in golds))


def score(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean F1 and EM in percent."""
    if not predictions:
        return {"f1": 0.0, "em": 0.0, "count": 0}
    pairs = [best_over_golds(p, g) for p, g in zip(predictions, golds, strict=True)]
    return {"f1": round(100 * sum(f for f, _ in pairs) / len(pairs), 4),
            "em": round(100 * sum(e for _, e in pairs) / len(pairs), 4), "count": len(pairs)}
