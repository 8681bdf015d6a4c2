"""Sharing deltas: export (bundle, PEFT folder), the model card, ``--mode push`` to the Hugging Face Hub, and
turning an OpenDelta checkpoint into an optqa one (see ARCHITECTURE.md)."""
