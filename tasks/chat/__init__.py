"""Talking to a checkpoint from the terminal: `tinyllama generate` (a completion)."""
