"""What the pages and the kernels must know of a model's attention, layer by layer.

`model_support` reads it off what the model does (one recording forward): what each layer gives
`Cache.update` is what its pages hold, and what its attention function receives is what the
kernels compute over. The two differ where the model transforms the cached K/V after the update:
MLA caches a compressed latent and a shared rotary key, and expands them into per-head K/V for
every cached token. Such a layer's update returns each sequence's whole context (`context`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer as hf_cb serves it.

    Attributes:
        num_heads: query heads (of this process's shard under tensor parallelism).
        kv_heads / k_dim: the keys the pages hold: heads and size, as the model gives them to
            `Cache.update` (or to its attention function, for a layer that updates no cache).
        v_heads / v_dim: the values the pages hold (MLA: its rotary key, 1 x the rotary size).
        window: a sliding window, in tokens (a query sees itself and ``window - 1`` before it).
        chunk: chunked attention (Llama 4): a query sees the tokens of its own chunk of this
            many positions, up to itself.
        context: `Cache.update` returns each sequence's whole cached context (the model
            transforms it before attending: MLA), rather than the step's new K/V.
        sinks: the layer adds per-head sink logits to the softmax's denominator (gpt-oss).
    """

    num_heads: int
    kv_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    window: int | None = None
    chunk: int | None = None
    context: bool = False
    sinks: bool = False

    def page_elems(self) -> int:
        """Elements a token of this layer takes in its pages, keys and values."""
        return self.kv_heads * self.k_dim + self.v_heads * self.v_dim


@dataclass(frozen=True)
class StateSpec:
    """What a layer keeps per sequence besides K/V pages (linear attention, state-space and
    convolution layers): each of its states' shape for one sequence, by state index, as
    Transformers' linear-attention cache layers hold them (``conv``: ``[channels, kernel]``;
    ``recurrent``: e.g. ``[heads, key_dim, value_dim]`` for Gated DeltaNet), and the dtypes the
    model computes them in, by name (``"float32"``, ``"bfloat16"``...)."""

    conv: tuple[tuple[int, ...] | None, ...]
    recurrent: tuple[tuple[int, ...] | None, ...]
    conv_dtype: str = "float32"
    recurrent_dtype: str = "float32"


@dataclass(frozen=True)
class AttentionShape:
    """A model's layers as one process runs them, by layer index: a `LayerSpec` for a layer that
    attends (None for one that does not), and a `StateSpec` for a layer that keeps a recurrent
    state (``states``: empty, or one entry per layer, None where it keeps none)."""

    layers: tuple[LayerSpec | None, ...]
    logit_softcap: float | None = None  # Gemma 2's attention logit soft-cap
    states: tuple[StateSpec | None, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attention(self) -> tuple[LayerSpec, ...]:
        """The specs of the layers that attend."""
        return tuple(s for s in self.layers if s is not None)

    @property
    def stateful(self) -> bool:
        """Whether any layer keeps a recurrent state per sequence."""
        return any(s is not None for s in self.states)

    def uniform(self) -> LayerSpec | None:
        """The one shape every attention layer has, or None where they differ in heads or sizes."""
        specs = self.attention
        if not specs:
            return None
        first = specs[0]
        same = all((s.num_heads, s.kv_heads, s.k_dim, s.v_heads, s.v_dim)
                   == (first.num_heads, first.kv_heads, first.k_dim, first.v_heads, first.v_dim) for s in specs)
        return first if same else None

    @property
    def num_heads(self) -> int:
        return self._uniform().num_heads

    @property
    def num_kv_heads(self) -> int:
        return self._uniform().kv_heads

    @property
    def head_dim(self) -> int:
        return self._uniform().k_dim

    def _uniform(self) -> LayerSpec:
        spec = self.uniform()
        if spec is None:
            raise ValueError("the model's layers differ in heads or head sizes: read them per layer (`layers`)")
        return spec

    def flashinfer_unsupported(self) -> str | None:
        """What of this attention hf_cb's FlashInfer backend does not serve yet, or None."""
        if self.stateful:
            return "the model keeps a recurrent state per sequence (linear-attention or state-space layers)"
        if any(s.context for s in self.attention):
            return "the model caches a compressed K/V that it expands after the cache (MLA)"
        spec = self.uniform()
        if spec is None:
            return "the model's layers differ in heads or head sizes"
        if spec.k_dim != spec.v_dim or spec.kv_heads != spec.v_heads:
            return "the model's keys and values differ in heads or sizes"
        if any(s.sinks for s in self.attention):
            return "the model's attention has sinks"
        if any(s.chunk is not None for s in self.attention):
            return "the model has chunked attention layers"
        return None


def uniform_shape(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  windows: list[int | None] | None = None, logit_softcap: float | None = None) -> AttentionShape:
    """Every layer alike: ``num_kv_heads`` heads of ``head_dim`` for keys and values."""
    windows = windows or [None] * num_layers
    return AttentionShape(tuple(LayerSpec(num_heads, num_kv_heads, head_dim, num_kv_heads, head_dim, window=w)
                                for w in windows), logit_softcap)
