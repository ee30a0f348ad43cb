"""The probe's steps: one step of two packed prompts (`packed_step`), or for a model with
recurrent state, batch-shaped steps as the engine runs them (`check_state_steps`), through
hf_cb's attention on a `RecordingStep` that counts each layer's K/V writes; and the checks on
what they did (`check_layers`, `check_logits`). `probe.probe_attention` runs them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from hf_cb.attention.backends.torch_backend import TorchAttentionBackend
from hf_cb.attention.context import AttentionStep
from hf_cb.attention.forward import forward_step, step_mask
from hf_cb.manager import PageManager
from hf_cb.model_support.shape import ModelNotSupported, is_device_fault
from hf_cb.paged_cache import PagedCache, PagedLayer

# Page size 4: each probe prompt spans pages.
_PROBE_PAGE_SIZE = 4


class RecordingStep:
    """A backend step that counts, per cache layer, the K/V writes of a step (each layer writes
    once: in the attention op, or, for a ``context`` layer, in its cache update) and, in all,
    the attention calls. Layers are told apart by their page tensors, which `paged_attention`
    takes by the attention module's ``layer_idx``."""

    def __init__(self, step: AttentionStep, cache: PagedCache):
        self.step = step
        self._layer_of = {(id(layer.keys), id(layer.values)): i for i, layer in enumerate(cache.layers)
                          if isinstance(layer, PagedLayer)}
        self.writes: Counter[int] = Counter()
        self.attends = 0
        # What the backend step (hf_cb's code) raised, if it did: it reaches the probe through
        # the model's frames, and must not be taken for the model's failure.
        self.error: Exception | None = None

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        self.writes[self._layer_of[(id(k_cache), id(v_cache))]] += 1
        self._recorded(self.step.write_kv, k_cache, v_cache, key, value)

    def attend(self, query, k_cache, v_cache, **kwargs) -> torch.Tensor:
        self.attends += 1
        return self._recorded(self.step.attend, query, k_cache, v_cache, **kwargs)

    def gather(self, k_cache, v_cache):
        return self._recorded(self.step.gather, k_cache, v_cache)

    def attend_context(self, query, key, value, **kwargs) -> torch.Tensor:
        self.attends += 1
        return self._recorded(self.step.attend_context, query, key, value, **kwargs)

    def _recorded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``, keeping what it raises in `error`."""
        try:
            return call(*args, **kwargs)
        except Exception as error:
            self.error = error
            raise


# The steps of the probe of a model with recurrent state, as the engine runs such models
# (batch-shaped: one sequence's prefill chunk, or a decode row per sequence): (sequence, first
# token, tokens) per row. A fresh prefill, a second one, that one's next chunk (which continues
# from its state), then both sequences' next token in one step (states gathered from two slots).
STATE_STEPS = (((0, 0, 2),), ((1, 0, 2),), ((1, 2, 2),), ((0, 2, 1), (1, 4, 1)))
# The same without chunks: each prompt prefilled in one step.
WHOLE_PREFILL_STEPS = (((0, 0, 2),), ((1, 0, 4),), ((0, 2, 1), (1, 4, 1)))


def check_state_steps(model, name, prompts, shape, expected, tolerance, steps) -> None:
    """Run ``steps`` over the prompts; every attention layer must attend once a step, and each
    step's logits match the model's own forward at those positions."""
    device = model.device
    offsets = [0, len(prompts[0])]  # where each prompt's rows start in ``expected``
    pages_per_seq = -(-max(len(p) for p in prompts) // _PROBE_PAGE_SIZE)
    num_pages = len(prompts) * pages_per_seq
    cache = PagedCache(shape.layers, num_pages, _PROBE_PAGE_SIZE, model.dtype, device,
                       states=shape.states, num_slots=len(prompts))
    manager = PageManager(num_pages, _PROBE_PAGE_SIZE, len(prompts), pages_per_seq)
    attending = [i for i, spec in enumerate(shape.layers) if spec is not None]
    for rows in steps:
        for seq, start, n in rows:
            manager.allocate(seq, start + n)
        table = manager.build([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        length = rows[0][2]
        ids = torch.stack([prompts[seq][start : start + n] for seq, start, n in rows]).to(device)
        slots = torch.tensor([manager.row_of(seq) for seq, _, _ in rows], device=device)
        step = RecordingStep(TorchAttentionBackend(_PROBE_PAGE_SIZE, device).plan(table), cache)
        keep = torch.arange(length, device=device) if len(rows) == 1 else 1
        try:
            with cache.bound(slots, fresh=rows[0][1] == 0):
                logits = forward_step(model, model, cache, step, ids,
                                      torch.from_numpy(table.positions).to(device).view(len(rows), length),
                                      step_mask(shape, device), keep)
        except Exception as error:
            raise_refusal(name, error, step, len(attending))
        check_layers(name, step, attending)
        want = torch.cat([expected[offsets[seq] + start : offsets[seq] + start + n] for seq, start, n in rows])
        check_logits(name, logits.float(), want, tolerance)


def packed_step(model, name, prompts, shape) -> tuple[RecordingStep, torch.Tensor]:
    """One step of the packed prompts, with the arguments `ModelRunner` passes."""
    lengths = [len(p) for p in prompts]
    pages_per_seq = -(-max(lengths) // _PROBE_PAGE_SIZE)
    num_pages = len(prompts) * pages_per_seq
    device = model.device
    cache = PagedCache(shape.layers, num_pages, _PROBE_PAGE_SIZE, model.dtype, device)
    manager = PageManager(num_pages, _PROBE_PAGE_SIZE, len(prompts), pages_per_seq)
    for seq_id, n in enumerate(lengths):
        manager.allocate(seq_id, n)
    table = manager.build(list(range(len(prompts))), [0] * len(prompts), lengths)
    step = RecordingStep(TorchAttentionBackend(_PROBE_PAGE_SIZE, device).plan(table), cache)
    try:
        logits = forward_step(
            model, model, cache, step, torch.cat(prompts).to(device)[None],
            torch.from_numpy(table.positions).to(device)[None],
            torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), torch.arange(table.num_tokens, device=device),
        )
    except Exception as error:
        raise_refusal(name, error, step, shape.num_layers)
    return step, logits.float()


def raise_refusal(name: str, error: Exception, step: RecordingStep, num_layers: int) -> NoReturn:
    """Re-raise what the probe step raised: a refusal naming where it failed if the model's own
    code failed on hf_cb's inputs, else as it is."""
    if _not_the_models(error, step.error):
        raise error
    raise ModelNotSupported(
        f"{name} failed a probe step through hf_cb's attention after {len(step.writes)} of "
        f"{num_layers} attention layers called the attention interface with hf_cb's step: "
        f"{type(error).__name__}: {error}"
    ) from error


def _not_the_models(error: Exception, backend_error: Exception | None) -> bool:
    """Whether ``error`` says nothing about the model: the device failed (out of memory, a
    fault), or hf_cb's own backend step raised it (``backend_error``), or a model's handler
    raised it while handling that."""
    if is_device_fault(error):
        return True
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # a chain can loop back on itself
        if cause is backend_error:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def check_layers(name: str, step: RecordingStep, attending: list[int]) -> None:
    """Each of the ``attending`` layers wrote its K/V once in the step, and attended once."""
    num_layers = len(attending)
    missing = [i for i in attending if step.writes[i] == 0]
    if missing:
        raise ModelNotSupported(
            f"{name}: {len(missing)} of {num_layers} attention layers did not call the attention interface "
            f"(layers {missing}); hf_cb serves models whose every layer does"
        )
    # Each write is the layer's K/V for the step: a second one (two modules with one layer_idx)
    # would overwrite the first's.
    repeated = [i for i in attending if step.writes[i] > 1]
    if repeated:
        raise ModelNotSupported(f"{name}: attention layers {repeated} wrote K/V more than once in one step (it runs a "
                                "layer's attention more than once per token, as differential or looped attention "
                                "does; hf_cb keeps one K/V per layer and token)")
    if step.attends != num_layers:
        raise ModelNotSupported(f"{name}: {step.attends} attention calls in a step of {num_layers} attention "
                                "layers; hf_cb serves models whose every layer attends once")


def check_logits(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    spread = (expected - expected.mean(-1, keepdim=True)).norm(dim=-1).clamp_min(1e-6)
    error = float(((got - expected).norm(dim=-1) / spread).max())
    if not error <= tolerance:  # NaN too
        raise ModelNotSupported(
            f"{name} computes different logits through hf_cb (relative error {error:.3f} on a "
            "packed probe step of two sequences): its forward depends on more than position_ids and the "
            "Cache, e.g. positions taken from the input ids, the attention mask or the cache's length, which a "
            "step of several sequences cannot give it"
        )
