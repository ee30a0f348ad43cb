"""The engine: `LLMEngine` (its build, step loop and memory) and the engine that lives on a model."""
