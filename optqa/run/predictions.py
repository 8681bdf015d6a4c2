"""Predictions files: one jsonl row per question, written by every scoring run and read back by ``--mode evaluate
--predictions_file`` / ``--compare_file``; rows are matched to the gold file by question id."""
from __future__ import annotations

from pathlib import Path

from optqa.errors import OptqaError
from optqa.metrics import best_over_golds, score


def _row(guid, question: str, golds: list[str], prediction: str) -> dict:
    f1, em = best_over_golds(prediction, golds)
    return {"question_id": guid, "question": question, "prediction": prediction, "answers": golds,
            "f1": round(100 * f1, 4), "em": round(100 * em, 4)}


def prediction_rows(encoded, predictions: list[str]) -> list[dict]:
    """One jsonl row per question: id, question, prediction, gold answers and the question's scores."""
    return [_row(e.guid, e.question, e.golds, p) for e, p in zip(encoded, predictions, strict=True)]


def read_predictions(path: str | Path, id_field: str = "question_id") -> dict[str, str]:
    """``question id -> prediction`` from a predictions jsonl (ours, or any with an id and a prediction).

    Ids are compared as strings so that ``7`` and ``"7"`` from different writers still match.
    """
    from optqa.data import iter_jsonl_objects

    id_keys = list(dict.fromkeys(("question_id", id_field)))
    predictions: dict[str, str] = {}
    for where, _, row in iter_jsonl_objects(path, "predictions file"):
        key = next((k for k in id_keys if k in row), None)
        if key is None:
            raise OptqaError(f"{where}: missing field {' or '.join(map(repr, id_keys))}")
        if not isinstance(row.get("prediction"), str):
            raise OptqaError(f"{where}: field 'prediction' must be a string")
        qid = str(row[key])
        if qid in predictions:
            raise OptqaError(f"{where}: question id {qid!r} appears twice")
        predictions[qid] = row["prediction"]
    if not predictions:
        raise OptqaError(f"{path}: no predictions in the file")
    return predictions


def _preview(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def match_predictions(examples, predictions: dict[str, str], source: str, gold: str) -> list[str]:
    """Predictions in the order of ``examples`` (InputExamples); any missing or extra id is an error."""
    ids = [str(e.guid) for e in examples]
    seen: set[str] = set()
    twice = [i for i in ids if i in seen or seen.add(i)]
    if twice:
        raise OptqaError(f"{gold}: question id {twice[0]!r} appears more than once, so predictions cannot be "
                         "matched by id (give every row a unique id, see --id_field)")
    missing = [i for i in ids if i not in predictions]
    extra = [i for i in predictions if i not in seen]
    if missing or extra:
        parts = ([f"{len(missing)} of {len(ids)} questions have no prediction ({_preview(missing)})"] if missing
                 else []) + ([f"{len(extra)} predictions are for ids not in {gold} ({_preview(extra)})"] if extra
                             else [])
        raise OptqaError(f"{source} does not match {gold}: " + "; ".join(parts) + " (check --split / --test_file)")
    return [predictions[i] for i in ids]


def score_predictions(examples, predictions: dict[str, str], source: str = "predictions",
                      gold: str = "gold") -> tuple[dict, list[dict]]:
    """Score id-keyed predictions against InputExamples: (metrics, prediction rows), as ``evaluate`` does."""
    ordered = match_predictions(examples, predictions, source, gold)
    golds = [list(e.tgt_text) for e in examples]
    rows = [_row(e.guid, e.text_a, g, p) for e, g, p in zip(examples, golds, ordered)]
    return score(ordered, golds), rows


def compare_rows(rows_a: list[dict], rows_b: list[dict]) -> tuple[dict, list[dict]]:
    """Question by question, B against A (same questions, same order): counts and the differing questions.

    A question is better/worse when B's F1 (then EM) is higher/lower; the rows returned are the questions
    whose predictions differ, scored or not.
    """
    counts = {"better": 0, "worse": 0, "same": 0}
    changed = []
    for a, b in zip(rows_a, rows_b, strict=True):
        delta = (b["f1"] - a["f1"], b["em"] - a["em"])
        change = "better" if delta > (0, 0) else "worse" if delta < (0, 0) else "same"
        counts[change] += 1
        if a["prediction"] != b["prediction"]:
            changed.append({"question_id": a["question_id"], "question": a["question"], "answers": a["answers"],
                            "change": change, "prediction_a": a["prediction"], "prediction_b": b["prediction"],
                            "f1_a": a["f1"], "f1_b": b["f1"], "em_a": a["em"], "em_b": b["em"],
                            "f1_change": round(delta[0], 4)})
    return counts, changed


# a question counts as answered right where its F1 (percent, best over the gold answers) passes this: ARC-DA's
# answers are free text, so a partly right answer ("the sun" for "sun and wind") counts, which EM would not
RIGHT_F1 = 50.0
# the four cases of a per-question comparison: metrics.jsonl key -> what the chart calls it
AGREEMENT = {"both_right": "both right", "only_a": "only A", "only_b": "only B", "both_wrong": "both wrong"}


def agreement(rows_a: list[dict], rows_b: list[dict], right_f1: float = RIGHT_F1) -> dict[str, int]:
    """Per question, which of A and B answered it right (F1 above ``right_f1`` percent): counts of the four
    ``AGREEMENT`` cases over the same questions in the same order (``score_predictions``' rows)."""
    cases = {(True, True): "both_right", (True, False): "only_a", (False, True): "only_b", (False, False): "both_wrong"}
    counts = dict.fromkeys(AGREEMENT, 0)
    for a, b in zip(rows_a, rows_b, strict=True):
        counts[cases[a["f1"] > right_f1, b["f1"] > right_f1]] += 1
    return counts
