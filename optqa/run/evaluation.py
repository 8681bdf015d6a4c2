"""Answering a split with a model, once per question, with one process or several (each answers a shard)."""
from __future__ import annotations

from tqdm.auto import tqdm

from optqa.metrics import score
from optqa.run.predictions import prediction_rows


def predict(model, encoded, batch_size: int, desc: str = "answering", accelerator=None) -> list[str]:
    """Answer every encoded prompt once; with several processes each answers a shard and all are gathered."""
    import torch

    from optqa.data import collate_for_generation, generation_batches
    from optqa.hardware import is_sharded

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = encoded[rank::world]
    answers: dict[int, str] = {}
    batches = generation_batches(shard, batch_size)
    idle_batches = 0
    if world > 1 and is_sharded(model):
        # a sharded backbone computes only with every process taking part: all run as many batches as the busiest
        counts = accelerator.gather(torch.tensor([len(batches)], device=accelerator.device))
        idle_batches = int(counts.max()) - len(batches)
    show = rank == 0
    for chunk in tqdm(batches, desc=desc, leave=False, disable=not show):
        batch = collate_for_generation(chunk, model.tokenizer.pad_token_id)
        answers.update(zip(batch["index"], model.generate_answers(batch)))
    for _ in range(idle_batches):
        model.generate_answers(collate_for_generation(encoded[:1], model.tokenizer.pad_token_id))  # answer discarded
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


def bare_model(config):
    """The backbone without any delta, prompted through ``config.template`` (``--mode evaluate --no_delta``).

    Args:
        config: a ``RunConfig``: plm_name, plm_path, template, max_seq_l, max_new_tokens, chat_template.
    Returns:
        A ``PromptForGeneration`` in eval mode whose every parameter is frozen.
    Raises:
        OptqaError: the backbone or template cannot be read, the prompts and answers would not fit the
            backbone's positions, or ``--chat_template`` where the tokenizer has none.
    """
    from optqa.build import template_text
    from optqa.model import PromptForGeneration
    from optqa.options import check_length_budget
    from optqa.plm import load_plm, max_positions_of
    from optqa.template import ManualTemplate

    text = template_text(config)
    plm, tokenizer, model_config, _ = load_plm(config.plm_name, config.plm_path)
    check_length_budget(config, max_positions_of(model_config.to_dict()), config.plm_path)
    template = ManualTemplate(tokenizer, text=text, source=config.template, embedding=plm.get_input_embeddings())
    model = PromptForGeneration(plm, template, tokenizer=tokenizer, max_seq_length=config.max_seq_l,
                                max_new_tokens=config.max_new_tokens)
    model.wrapper.use_chat_template(config.chat_template)
    return model.eval()


def use_shots(model, config) -> None:
    """``--num_shots K``: K training questions with their first gold answer before every prompt of ``model``,
    drawn once with ``--seed`` from the train split (``optqa.data.draw_shots``); nothing when K is 0.

    Raises:
        OptqaError: the train split cannot be read or has too few questions.
    """
    if not config.num_shots:
        return
    from optqa.data import draw_shots, load_split

    model.wrapper.use_shots(draw_shots(load_split(config, "train"), config.num_shots, config.seed), config.num_shots)
