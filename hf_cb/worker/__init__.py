"""The worker: one engine step on the model (pack the rows, run its own forward, sample)."""
