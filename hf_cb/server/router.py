"""`Router`: several engine replicas behind one front end (``hf-cb serve --data-parallel-size``).

It has the `EngineClient` interface the routes use. Each request goes to the replica with the
fewest outstanding tokens (its unfinished requests' prompts plus what they may still generate):
a replica busy with long prompts or long answers gets fewer new ones, not just fewer requests.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from hf_cb.sampling.params import SamplingParams


class Router:
    """The engines requests may go to; `add` one as it joins."""

    def __init__(self, first: Any):
        self.engines = [first]

    def add(self, engine: Any) -> None:
        self.engines = [*self.engines, engine]  # a new list: the event loop may be iterating

    def pick(self) -> Any:
        """The engine with the fewest outstanding tokens (the first of equals)."""
        engines = self.engines
        if len(engines) == 1:  # one replica (plain ``hf-cb serve``): no need to count
            return engines[0]
        return min(engines, key=lambda e: e.outstanding_tokens())

    # -- the EngineClient interface -----------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return all(e.is_alive for e in self.engines)

    @property
    def error(self) -> BaseException | None:
        return next((e.error for e in self.engines if e.error is not None), None)

    @property
    def max_model_len(self) -> int:
        return self.engines[0].max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engines[0].vocab_size

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError unless every replica can run the request (their page pools may
        differ: each sizes its own from its GPU's free memory), wherever it is routed."""
        for engine in self.engines:
            engine.check_request(prompt_ids, params)

    def submit(self, prompt_ids: Seq[int], params: SamplingParams, seed: int | None = None, **kwargs: Any):
        """As `EngineClient.submit`, on the replica `pick` chooses (the stream's aborts go there)."""
        return self.pick().submit(prompt_ids, params, seed, **kwargs)

    def num_requests(self) -> tuple[int, int]:
        counts = [e.num_requests() for e in self.engines]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def kv_cache_usage(self) -> float:
        return sum(e.kv_cache_usage() for e in self.engines) / len(self.engines)

    def prefix_cache_stats(self) -> tuple[int, int]:
        stats = [e.prefix_cache_stats() for e in self.engines]
        return sum(q for q, _ in stats), sum(h for _, h in stats)
