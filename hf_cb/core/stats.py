"""What the engine counts as it runs (`LLMEngine.stats`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StepStats:
    """Where the host's time goes: ``host_s`` scheduling, preparing and launching steps and
    reading their results; ``wait_s`` blocked on the device for sampled tokens."""

    steps: int = 0
    decode_steps: int = 0
    tokens: int = 0  # fed to the model (prompt tokens found in the prefix cache are not)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of them, found there
    host_s: float = 0.0
    wait_s: float = 0.0

    def summary(self) -> dict:
        per_step = max(self.steps, 1) * 1e-3
        return {**asdict(self), "host_ms_per_step": self.host_s / per_step, "wait_ms_per_step": self.wait_s / per_step}
