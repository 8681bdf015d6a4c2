"""Runs: the accelerate process group, answering and scoring a split, the run folder, the training recipe."""
