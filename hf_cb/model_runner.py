"""One step on the model: pack the scheduled rows, run the model's own forward, sample."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from .attention_interface import STEP_KWARG, AttentionStep
from .manager import PageManager
from .paged_cache import PagedCache
from .sampling import make_sampling_batch, sample
from .scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """The packed tensors of one forward: a single row of ``T`` tokens."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [S]: the last token of each sampling row
    sample_rows: list[int]  # which rows of the batch sample a token
    step: AttentionStep


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedCache, manager: PageManager, backend):
        self.model = model
        self.cache = cache
        self.manager = manager
        self.backend = backend
        self.device = model.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # A 4-D mask makes the model skip all mask construction; the step does the masking.
        self._mask_sentinel = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        seqs, num_new = batch.seqs, batch.num_new_tokens
        num_cached = [s.num_cached_tokens for s in seqs]
        table = self.manager.build([s.seq_id for s in seqs], num_cached, num_new)
        tokens = chain.from_iterable(s.token_ids[c : c + n] for s, c, n in zip(seqs, num_cached, num_new))
        input_ids = np.fromiter(tokens, dtype=np.int64, count=table.num_tokens)
        sample_rows = [row for row in range(len(seqs)) if batch.samples(row)]
        logits_indices = table.qo_indptr[1:][sample_rows].astype(np.int64) - 1
        return StepInputs(
            input_ids=self._to_device(input_ids)[None],
            position_ids=self._to_device(table.positions)[None],
            logits_indices=self._to_device(logits_indices),
            sample_rows=sample_rows,
            step=self.backend.plan(table),
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.no_grad()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits ``[S, V]`` of the sampling rows."""
        self.cache.step = inputs.step
        try:
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                attention_mask=self._mask_sentinel,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=inputs.logits_indices,
                **{STEP_KWARG: inputs.step},
            )
        finally:
            self.cache.step = None
        return out.logits[0]

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step; return the sampled token of each row (None for a mid-prompt chunk)."""
        inputs = self.prepare(batch)
        logits = self.forward(inputs)
        tokens: list[int | None] = [None] * len(batch.seqs)
        if not inputs.sample_rows:
            return tokens
        seqs = [batch.seqs[r] for r in inputs.sample_rows]
        sampling = make_sampling_batch(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [s.token_ids for s in seqs],
            [s.num_generated for s in seqs],
            logits.shape[-1],
            self.device,
        )
        for row, token in zip(inputs.sample_rows, sample(logits.float(), sampling).tolist()):
            tokens[row] = token
        return tokens
