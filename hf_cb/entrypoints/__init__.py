"""The front doors in Python: generate's arguments and hooks, the online engine and its streams,
data-parallel generation, and loading a model."""
