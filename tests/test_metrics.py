"""Token F1 and exact match against answers worked out by hand (SQuAD v1.1 normalisation, max over golds)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from optqa.metrics import best_over_golds, exact_match, normalize_answer, score, token_f1
from optqa.run.predictions import prediction_rows


@pytest.mark.parametrize("raw, normal", [
    ("The Sun", "sun"),                      # case and a leading article
    ("  the   red\tplanet \n", "red planet"),  # any run of white space becomes one space
    ("Carbon-Dioxide!", "carbondioxide"),    # punctuation is deleted, not replaced by a space
    ("an apple a day", "apple day"),         # every article, not only the first
    ("theory", "theory"),                    # "the" inside a word is not an article
    ("A.", ""),                              # an answer may normalise to nothing
])
def test_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("prediction, gold, f1", [
    ("the heart", "heart", 1.0),
    # pred {red, planet, mars}, gold {mars}: P = 1/3, R = 1, F1 = 2PR/(P+R) = 1/2
    ("the red planet mars", "mars", 0.5),
    # pred {carbon, dioxide, gas}, gold {carbon, dioxide}: P = 2/3, R = 1, F1 = 4/5
    ("carbon dioxide gas", "Carbon dioxide.", 0.8),
    # repeated tokens count once per occurrence on both sides: overlap min(2,1) + min(1,2) = 2, P = R = 2/3
    ("water water vapor", "water vapor vapor", 2 / 3),
    ("ice", "liquid water", 0.0),
    ("", "ice", 0.0),
    ("the", "ice", 0.0),  # the prediction is empty after normalisation
    ("", "an", 1.0),      # both empty after normalisation: SQuAD counts that as a match
])
def test_token_f1(prediction, gold, f1):
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_exact_match_is_after_normalisation():
    assert exact_match("  THE Heart. ", "heart") == 1.0
    assert exact_match("heart", "the hearts") == 0.0
    assert exact_match("", "ice") == 0.0


def test_best_over_golds_takes_each_metric_from_its_best_gold():
    # F1 against "the sun" is 2/3 (P = 1/2, R = 1); "sunlight" shares no token; no gold matches exactly
    assert best_over_golds("sun light", ["sunlight", "the sun"]) == (pytest.approx(2 / 3), 0.0)
    assert best_over_golds("heart", ["blood pump", "the heart"]) == (1.0, 1.0)


def test_score_is_a_percentage_over_questions():
    predictions = ["ice", "The heart!", "sun light", ""]
    golds = [["ice"], ["blood pump", "heart"], ["the sun"], ["mars"]]
    # per question F1: 1, 1, 2/3, 0 -> mean 2.6667 / 4; EM: 1, 1, 0, 0
    assert score(predictions, golds) == {"f1": 66.6667, "em": 50.0, "count": 4}
    assert score([], []) == {"f1": 0.0, "em": 0.0, "count": 0}
    with pytest.raises(ValueError):
        score(["ice"], [["ice"], ["mars"]])


def test_prediction_rows_carry_the_per_question_scores():
    encoded = [SimpleNamespace(guid="q1", question="What is frozen water called?", golds=["ice", "frozen water"]),
               SimpleNamespace(guid="q2", question="Which planet is red?", golds=["mars"])]
    rows = prediction_rows(encoded, ["water ice", "Mars."])
    assert rows == [
        # "water ice" vs "ice": P = 1/2, R = 1 -> 2/3; vs "frozen water": P = R = 1/2 -> 1/2; best 2/3
        {"question_id": "q1", "question": "What is frozen water called?", "prediction": "water ice",
         "answers": ["ice", "frozen water"], "f1": 66.6667, "em": 0.0},
        {"question_id": "q2", "question": "Which planet is red?", "prediction": "Mars.", "answers": ["mars"],
         "f1": 100.0, "em": 100.0},
    ]
