"""Module level: the built-in training loop (data, batching, optimisation, checkpoints, evaluation)."""
