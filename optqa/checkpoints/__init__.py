"""The delta checkpoint format: the files and their checks (the one backbone check among them), bundles, ``hf://``
pulls, PEFT and OpenDelta files, ``--mode inspect`` (see ARCHITECTURE.md)."""
