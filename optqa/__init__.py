"""optqa: delta tuning of OPT language models for direct-answer question answering.

The OpenPrompt + OpenDelta workflow on transformers + PEFT::

    plm, tokenizer, model_config, WrapperClass = load_plm("opt", "facebook/opt-125m")
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora"}), backbone_model=plm)
    template = ManualTemplate(tokenizer, text='{"placeholder":"text_a"} Answer: {"mask"}')
    model = PromptForGeneration(plm, template)

and what a course script calls besides (PromptDataLoader, GenerationVerbalizer, MixedTemplate, ...; docs/library.md).
"""
__version__ = "0.1.0"

_EXPORTS = {
    "load_plm": "plm", "ManualTemplate": "template", "AutoDeltaConfig": "deltas",
    "AutoDeltaModel": "compat.opendelta", "PromptForGeneration": "compat.openprompt", "InputExample": "data",
    "LMTokenizerWrapper": "data", "RunConfig": "config", "OptqaError": "errors", "load_trained": "build",
    # the rest of what an OpenPrompt/OpenDelta course script calls (a script ports by changing its imports)
    "PromptDataLoader": "compat.openprompt", "GenerationVerbalizer": "compat.openprompt",
    "MixedTemplate": "compat.openprompt", "PrefixTuningTemplate": "compat.openprompt",
    "SoftTemplate": "compat.openprompt", "PtuningTemplate": "compat.openprompt",
    "SoftManualTemplate": "compat.openprompt", "PTRTemplate": "compat.openprompt",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # lazy: `python -m optqa --help` and the REPL's start-up should not pay for importing torch twice over
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"optqa.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
