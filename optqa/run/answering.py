"""Loading a checkpoint to answer with: the path that ``--mode evaluate``, ``--mode interactive_inference`` and the
benchmarks share."""
from __future__ import annotations

from typing import Any

# the settings a checkpoint records that a setting given on the command line replaces
CHECKPOINT_OVERRIDES = ("max_new_tokens", "eval_batch_size", "precision", "max_seq_l", "chat_template")


def load_for_answering(config: Any, quantize_default: str = "auto", background: bool = False):
    """Load the checkpoint ``config.delta_save_path`` and make it ready to answer on this machine.

    The checkpoint rebuilds everything (backbone, template, delta, its recorded settings); a setting that ``config``
    gives (not None) replaces the recorded one: ``plm_path``, ``template`` and those in ``CHECKPOINT_OVERRIDES``
    that ``config`` has. How to answer on this machine (``quantize``, ``merge_lora``, ``num_threads``) is never taken
    from the checkpoint; the ``quantize`` actually applied is written back into ``config.quantize`` (and so into a
    run folder's config.json).

    Args:
        config: a mode's config (``optqa.config.MODE_CONFIGS["evaluate"]`` or ``["interactive_inference"]``, where
            None means "not given"); a ``RunConfig`` gives every setting, so every one replaces the recorded one.
        quantize_default: what ``quantize=None`` means: ``auto`` where a person waits for the answer, ``none``
            where scores are reported.
        background: quantise in a thread (``optqa.answering.wait_until_ready`` before answering).
    Returns:
        ``(model, manifest, saved)``: the ``PromptForGeneration`` in eval mode, the checkpoint's manifest, and the
        RunConfig it answers with (the recorded settings with the overrides on top).
    Raises:
        OptqaError: a missing, tampered or mismatched checkpoint, or settings that cannot work together.
    """
    from optqa.answering import prepare_for_answering
    from optqa.build import load_trained
    from optqa.hardware import configure_threads

    settings = config.resolved()
    configure_threads(settings.num_threads)
    overrides = {k: getattr(config, k) for k in CHECKPOINT_OVERRIDES if getattr(config, k, None) is not None}
    model, manifest, saved = load_trained(settings.delta_save_path, plm_path=config.plm_path,
                                          ignore_backbone_mismatch=settings.ignore_backbone_mismatch,
                                          overrides=overrides, template=config.template,
                                          merge_lora=settings.merge_lora, answer_only=True)
    configure_threads(settings.num_threads, hidden_size=model.backbone.config.hidden_size)
    saved.quantize, saved.merge_lora = settings.quantize, settings.merge_lora
    config.quantize = prepare_for_answering(model, saved, default=quantize_default, background=background)
    return model, manifest, saved
