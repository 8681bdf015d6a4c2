"""Delta checkpoints on disk: the format and its checks, bundles, the Hub, PEFT and OpenDelta files, and
building a model from a config or a checkpoint (see ARCHITECTURE.md)."""
