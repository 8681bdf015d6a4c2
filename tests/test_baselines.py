"""Baselines in ``--mode evaluate``: the bare backbone (--no_delta), K shots (--num_shots, drawn with --seed) and
the tokenizer's chat template (--chat_template), with the exact prompts they build, their refusals, and scores
written as a delta's are. A delta trained with --chat_template records it and answers with it everywhere."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import MEMORY_SET, train_in_process, write_split

from optqa.cli import main as cli_main
from optqa.config import RunConfig
from optqa.data import InputExample, draw_shots, load_split
from optqa.errors import OptqaError
from optqa.run.evaluation import bare_model, use_shots

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEV = [("What falls from clouds as rain or snow?", ["water", "precipitation"]),
       ("What melts when it is warmed?", ["ice"])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train = the eight memory questions; dev = two others."""
    folder = tmp_path_factory.mktemp("baseline-data")
    write_split(folder, MEMORY_SET, "train")
    write_split(folder, DEV, "dev")
    write_split(folder, DEV, "test")
    return folder


@pytest.fixture(scope="module")
def chat_opt(tiny_opt, tmp_path_factory) -> Path:
    """tiny_opt whose tokenizer has a ChatML chat template."""
    folder = tmp_path_factory.mktemp("chat-opt") / "opt"
    shutil.copytree(tiny_opt, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHATML}))
    return folder


def _model(plm: Path, data: Path, **flags):
    config = RunConfig(mode="evaluate", plm_path=str(plm), data_path=str(data), no_delta=True, **flags)
    model = bare_model(config)
    use_shots(model, config)
    return model, config


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _plain_prompt(model, question: str) -> list[int]:
    """The default template's pieces, tokenised one by one as optqa tokenises them."""
    return _ids(model, question) + _ids(model, " Answer:")


def _drawn(seed: int, count: int) -> list[int]:
    """Which training questions --seed draws: ``random.Random(seed).sample``, the documented draw."""
    return random.Random(seed).sample(range(len(MEMORY_SET)), count)


def _example(question: str) -> InputExample:
    return InputExample(guid="q", text_a=question)


# ---- the prompts ----------------------------------------------------------------------------------------------


def test_zero_shot_is_the_template_alone(tiny_opt, data):
    model, _ = _model(tiny_opt, data)
    encoded = model.wrapper.encode(_example(DEV[0][0]))
    assert encoded.prompt_ids == [model.wrapper.bos_id, *_plain_prompt(model, DEV[0][0])]
    assert model.tokenizer.decode(encoded.prompt_ids[1:]) == f"{DEV[0][0]} Answer:"
    assert model.num_trainable_parameters() == 0 and model.delta is None


def test_k_shots_come_first_the_same_for_every_question(tiny_opt, data):
    model, _ = _model(tiny_opt, data, num_shots=2, seed=1)
    shots = [MEMORY_SET[i] for i in _drawn(1, 3)[:2]]
    prefix = [model.wrapper.bos_id]
    for question, answers in shots:
        prefix += _plain_prompt(model, question) + _ids(model, " " + answers[0]) + _ids(model, "\n")
    for question, _ in DEV:
        encoded = model.wrapper.encode(_example(question))
        assert encoded.prompt_ids == prefix + _plain_prompt(model, question)
    text = model.tokenizer.decode(model.wrapper.encode(_example(DEV[1][0])).prompt_ids[1:])
    assert text == (f"{shots[0][0]} Answer: {shots[0][1][0]}\n{shots[1][0]} Answer: {shots[1][1][0]}\n"
                    f"{DEV[1][0]} Answer:")


def test_shots_follow_the_seed(tiny_opt, data):
    train = load_split(RunConfig(data_path=str(data)), "train")
    picks = {seed: [e.text_a for e in draw_shots(train, 3, seed)] for seed in (0, 1)}
    assert picks[0] != picks[1]
    assert picks[0] == [e.text_a for e in draw_shots(train, 3, 0)]
    assert picks[0] == [MEMORY_SET[i][0] for i in _drawn(0, 4)]


def test_a_question_is_never_its_own_shot(tiny_opt, data):
    """Scoring the train split: where the question is a shot, the next drawn question takes its place, last."""
    model, _ = _model(tiny_opt, data, num_shots=2, seed=1)
    first, second, spare = (MEMORY_SET[i] for i in _drawn(1, 3))
    for asked, expected in ((first, [second, spare]), (second, [first, spare])):
        shots = model.wrapper.shots_for(_example(asked[0]))
        assert [s.text_a for s in shots] == [q for q, _ in expected]
        assert asked[0] not in [s.text_a for s in shots]


def test_shots_are_never_cut_the_question_is(tiny_opt, data):
    model, _ = _model(tiny_opt, data, num_shots=1, seed=0, max_seq_l=40)
    long = "Which of these " + "very " * 60 + "long words is a question?"
    encoded = model.wrapper.encode(_example(long))
    shot, answers = MEMORY_SET[_drawn(0, 2)[0]]
    prefix = [model.wrapper.bos_id, *_plain_prompt(model, shot), *_ids(model, " " + answers[0]), *_ids(model, "\n")]
    assert encoded.truncated and encoded.prompt_ids[:len(prefix)] == prefix
    assert len(encoded.prompt_ids) == 40 and encoded.prompt_ids[-len(_ids(model, " Answer:")):] == _ids(model,
                                                                                                        " Answer:")


def test_the_chat_template_holds_the_prompt_and_the_shots(chat_opt, data):
    model, _ = _model(chat_opt, data, chat_template=True)
    encoded = model.wrapper.encode(_example(DEV[0][0]))
    assert encoded.prompt_ids == _ids(model, f"<|im_start|>user\n{DEV[0][0]} Answer:<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    # a training target follows the assistant's header as the message's text: no leading space
    assert model.wrapper.encode_target("ice") == _ids(model, "ice") + [model.tokenizer.eos_token_id]
    model, _ = _model(chat_opt, data, chat_template=True, num_shots=1, seed=3)
    shot, answers = MEMORY_SET[_drawn(3, 2)[0]]
    assert model.wrapper.encode(_example(DEV[1][0])).prompt_ids == _ids(
        model, f"<|im_start|>user\n{shot} Answer:<|im_end|>\n<|im_start|>assistant\n{answers[0]}<|im_end|>\n"
               f"<|im_start|>user\n{DEV[1][0]} Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_a_chat_prompt_is_cut_to_max_seq_l(chat_opt, data):
    model, _ = _model(chat_opt, data, chat_template=True, max_seq_l=60)
    long = "Which of these " + "very " * 60 + "long words is a question?"
    encoded = model.wrapper.encode(_example(long))
    assert encoded.truncated and len(encoded.prompt_ids) <= 60 and encoded.question_tokens > 5
    text = model.tokenizer.decode(encoded.prompt_ids)
    assert text.startswith("<|im_start|>user\nWhich of these very") and text.endswith(
        "<|im_end|>\n<|im_start|>assistant\n")


# ---- refusals -------------------------------------------------------------------------------------------------


def _error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli_main(list(args)) == 2
    out, err = capsys.readouterr()
    # the last line: loading a backbone in this process may draw transformers' loading bar first
    assert out == "" and err.endswith("\n") and err.splitlines()[-1].startswith("error: ")
    return err.splitlines()[-1]


@pytest.mark.parametrize("args, line", [
    (["--mode", "train", "--no_delta"],
     "--no_delta does not apply to --mode train (it is read by --mode evaluate); drop it"),
    (["--mode", "train", "--num_shots", "2"],
     "--num_shots does not apply to --mode train (it is read by --mode evaluate); drop it"),
    (["--mode", "interactive_inference", "--num_shots", "2"],
     "--num_shots does not apply to --mode interactive_inference (it is read by --mode evaluate); drop it"),
    (["--mode", "serve", "--chat_template"],
     "--chat_template does not apply to --mode serve (it is read by --mode train, --mode evaluate); drop it"),
    (["--mode", "evaluate", "--no_delta", "--delta_save_path", "some/delta"],
     "--no_delta scores the bare backbone and reads no checkpoint; drop --delta_save_path (or --no_delta)"),
    # the default folder, typed, is a checkpoint asked for all the same
    (["--mode", "evaluate", "--no_delta", "--delta_save_path", "./delta_ckpts/"],
     "--no_delta scores the bare backbone and reads no checkpoint; drop --delta_save_path (or --no_delta)"),
    (["--mode", "evaluate", "--num_shots", "2", "--predictions_file", "p.jsonl"],
     "--num_shots sets how a model is prompted, and --predictions_file scores answers already written; drop one "
     "of them"),
    (["--mode", "evaluate", "--no_delta", "--predictions_file", "p.jsonl"],
     "--no_delta sets how a model is prompted, and --predictions_file scores answers already written; drop one "
     "of them"),
    (["--mode", "evaluate", "--num_shots", "-1"], "--num_shots must be at least 0, got -1"),
])
def test_refusals_before_any_model(capsys, args, line):
    assert _error(capsys, *args) == f"error: {line}"


def _evaluate(plm: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--mode", "evaluate", "--no_delta", "--plm_path", str(plm), "--data_path", str(data), "--split", "dev",
            "--output_dir", str(out / "runs"), "--max_new_tokens", "2", *extra]


def test_refusals_with_the_backbone(capsys, tiny_opt, data, tmp_path):
    assert _error(capsys, *_evaluate(tiny_opt, data, tmp_path, "--chat_template")) == (
        f"error: --chat_template: the tokenizer of {tiny_opt} has no chat template (no chat_template in its "
        "tokenizer_config.json); drop --chat_template")
    assert _error(capsys, *_evaluate(tiny_opt, data, tmp_path, "--num_shots", "3", "--max_seq_l", "24")) == (
        "error: --num_shots 3: the shots leave no room for question dev-0 within --max_seq_l 24 tokens; lower "
        "--num_shots or raise --max_seq_l")
    assert _error(capsys, *_evaluate(tiny_opt, data, tmp_path, "--num_shots", "9")) == (
        "error: --num_shots 9 asks for more shots than the 8 questions of the train split; lower --num_shots")
    assert not (tmp_path / "runs").exists()


def test_a_soft_template_has_no_chat_form(chat_opt, data):
    with pytest.raises(OptqaError, match=r'template with \{"soft"\} pieces has no text form'):
        _model(chat_opt, data, chat_template=True, template="templates/soft_answer_template.txt")


# ---- scores, as for a delta -----------------------------------------------------------------------------------


def test_a_baseline_is_scored_and_recorded_like_a_delta(capsys, chat_opt, data, tmp_path):
    capsys.readouterr()
    # the tiny tokenizer spells ChatML's markers in many tokens: room for two shots in a chat
    argv = _evaluate(chat_opt, data, tmp_path, "--num_shots", "2", "--chat_template", "--max_seq_l", "200")
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    run = next((tmp_path / "runs").glob("evaluate-*"))
    rows = [json.loads(line) for line in (run / "predictions_dev.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["dev-0", "dev-1"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{"split": "dev", "dev_f1": metrics[0]["dev_f1"], "dev_em": metrics[0]["dev_em"], "count": 2,
                        "source": f"{chat_opt} (no delta)", "quantize": "none", "no_delta": True, "num_shots": 2,
                        "chat_template": True}]
    assert metrics[0]["dev_f1"] == pytest.approx(sum(r["f1"] for r in rows) / 2)
    assert out.startswith(f"dev: F1 {metrics[0]['dev_f1']:.2f} EM {metrics[0]['dev_em']:.2f} on 2 questions from "
                          f"{chat_opt} (no delta); predictions in {run / 'predictions_dev.jsonl'}")
    assert json.loads((run / "config.json").read_text())["num_shots"] == 2


def test_a_delta_trained_with_the_chat_template_records_it_and_answers_with_it(chat_opt, data, tmp_path, capsys):
    from optqa.build import load_shared, load_trained

    summary = train_in_process(chat_opt, data, tmp_path, "--delta_type", "lora", "--chat_template",
                               "--train_epochs", "1", "--max_steps", "1", "--max_new_tokens", "2")
    manifest = json.loads((Path(summary.delta_save_path) / "optqa_manifest.json").read_text())
    assert manifest["hyperparameters"]["chat_template"] is True
    model, _, _ = load_trained(summary.delta_save_path, answer_only=True)
    assert model.wrapper.chat_template  # the question loop and evaluate load it this way
    served = load_shared({"chat": summary.delta_save_path})
    assert served["chat"][0].wrapper.chat_template
    prompt = model.wrapper.encode(_example(DEV[0][0])).prompt_ids
    assert model.tokenizer.decode(prompt).startswith("<|im_start|>user\n")
    capsys.readouterr()
    assert cli_main(["--mode", "evaluate", "--delta_save_path", summary.delta_save_path, "--data_path", str(data),
                     "--split", "dev", "--output_dir", str(tmp_path / "eval")]) == 0
    row = json.loads(next((tmp_path / "eval").glob("evaluate-*/metrics.jsonl")).read_text())
    assert row["chat_template"] is True and row["no_delta"] is False and row["num_shots"] == 0


def test_a_saved_delta_can_be_scored_with_shots(capsys, tiny_opt, data, tmp_path):
    from optqa.build import load_trained
    from optqa.tiny import build_random_checkpoint

    ckpt = build_random_checkpoint(tiny_opt, tmp_path / "delta", "lora", max_new_tokens=2)
    capsys.readouterr()
    assert cli_main(["--mode", "evaluate", "--delta_save_path", str(ckpt), "--data_path", str(data), "--split", "dev",
                     "--num_shots", "1", "--seed", "5", "--output_dir", str(tmp_path / "runs")]) == 0
    row = json.loads(next((tmp_path / "runs").glob("evaluate-*/metrics.jsonl")).read_text())
    assert (row["source"], row["no_delta"], row["num_shots"], row["chat_template"]) == (str(ckpt), False, 1, False)
    # the prompts it answered: the drawn shot, then the question, through the checkpoint's template
    model, _, _ = load_trained(ckpt, answer_only=True)
    use_shots(model, RunConfig(data_path=str(data), num_shots=1, seed=5))
    shot, answers = MEMORY_SET[_drawn(5, 2)[0]]
    assert model.tokenizer.decode(model.wrapper.encode(_example(DEV[0][0])).prompt_ids[1:]) == (
        f"{shot} Answer: {answers[0]}\n{DEV[0][0]} Answer:")
