"""Token F1 and exact match (SQuAD normalisation, max over gold answers), and scoring a model on a split."""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable

from tqdm.auto import tqdm

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, squeeze white space (SQuAD v1.1's evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
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


def prediction_rows(encoded, predictions: list[str]) -> list[dict]:
    """One jsonl row per question: id, question, prediction, gold answers and the question's scores."""
    rows = []
    for example, prediction in zip(encoded, predictions, strict=True):
        f1, em = best_over_golds(prediction, example.golds)
        rows.append({"question_id": example.guid, "question": example.question, "prediction": prediction,
                     "answers": example.golds, "f1": round(100 * f1, 4), "em": round(100 * em, 4)})
    return rows


def predict(model, encoded, batch_size: int, desc: str = "answering", accelerator=None) -> list[str]:
    """Answer every encoded prompt once; with several processes each answers a shard and all are gathered."""
    from .data import collate_for_generation, generation_batches

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = encoded[rank::world]
    answers: dict[int, str] = {}
    batches = generation_batches(shard, batch_size)
    show = rank == 0
    for chunk in tqdm(batches, desc=desc, leave=False, disable=not show):
        batch = collate_for_generation(chunk, model.tokenizer.pad_token_id)
        answers.update(zip(batch["index"], model.generate(batch)))
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[int, str] = {}
        for part in gather_object([answers]):
            merged.update(part)
        answers = merged
    return [answers[e.index] for e in encoded]


def evaluate(model, encoded, batch_size: int, desc: str = "answering", accelerator=None):
    """Score a model on encoded prompts: returns (metrics, prediction rows)."""
    predictions = predict(model, encoded, batch_size, desc, accelerator)
    return score(predictions, [e.golds for e in encoded]), prediction_rows(encoded, predictions)
