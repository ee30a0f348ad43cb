"""The model shapes and workloads of BENCHMARKS.md, and the roofline every result is a fraction of."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MODELS = {
    "llama-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, max_position_embeddings=4096)),
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=4096)),
    "llama-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=8192)),
    # Hybrid linear-attention shapes (BENCHMARKS.md): three Gated DeltaNet layers to one attention layer.
    "qwen3.5-9b": ("Qwen3_5TextConfig", dict(max_position_embeddings=4096)),
    "qwen3-next-16l": ("Qwen3NextConfig", dict(num_hidden_layers=16, max_position_embeddings=4096)),
}
ALIASES = {"W1": "mixed", "W2": "rollouts", "W3": "prefill", "W4": "gsm8k-like", "W5": "shared-prefix", "W6": "grpo"}


@dataclass
class Workload:
    """Requests: ``prompts[i]`` sampled ``n`` times (``num_return_sequences``), each sample
    ``output_lens[i]`` tokens long. ``prefill_tokens``: the prompt tokens the roofline prefills
    (shared prefixes and the ``n`` samples of a prompt once); default all of them."""

    prompts: list[list[int]]
    output_lens: list[int]
    n: int = 1
    do_sample: bool = False
    prefill_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.n * sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return self.n * sum(self.output_lens)

    @property
    def completion_lens(self) -> list[int]:
        """The length of every completion, grouped by prompt (as hf_cb returns them)."""
        return [k for k in self.output_lens for _ in range(self.n)]

    def expanded(self) -> "Workload":
        """One prompt per completion (``n`` copies of each): for systems without ``n``."""
        prompts = [p for p in self.prompts for _ in range(self.n)]
        return Workload(prompts, self.completion_lens, 1, self.do_sample, self.prefill_tokens)

    def head(self, count: int, max_output: int | None = None) -> "Workload":
        """The first ``count`` prompts (outputs cut to ``max_output``): smoke and warm-up runs."""
        lens = self.output_lens[:count]
        return Workload(self.prompts[:count], [min(k, max_output) for k in lens] if max_output else lens,
                        self.n, self.do_sample)


def _uniform(n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int]):
    """Random(0) draws each prompt (its length, then its tokens), then all output lengths."""

    def make(rng: random.Random, token) -> Workload:
        prompts = [[token() for _ in range(rng.randint(*prompt_lens))] for _ in range(n)]
        return Workload(prompts, [rng.randint(*output_lens) for _ in range(n)])

    return make


def _shared_prefix(rng: random.Random, token) -> Workload:
    """W5: 1024 requests, each one of 16 shared 2048-token prefixes plus a unique suffix of
    32..256 tokens, 128 output tokens; shuffled, so a prefix's requests are not adjacent."""
    prefixes = [[token() for _ in range(2048)] for _ in range(16)]
    prompts = [prefixes[i % 16] + [token() for _ in range(rng.randint(32, 256))] for i in range(1024)]
    rng.shuffle(prompts)
    prefill = 16 * 2048 + sum(len(p) - 2048 for p in prompts)
    return Workload(prompts, [128] * len(prompts), prefill_tokens=prefill)


def _grpo(rng: random.Random, token) -> Workload:
    """W6: 64 prompts of 512 tokens, 16 samples each (temperature 1.0), 512 output tokens."""
    prompts = [[token() for _ in range(512)] for _ in range(64)]
    return Workload(prompts, [512] * 64, n=16, do_sample=True, prefill_tokens=64 * 512)


WORKLOADS = {
    "mixed": _uniform(256, (100, 1024), (100, 1024)),
    "rollouts": _uniform(32, (256, 256), (1024, 1024)),
    "prefill": _uniform(1000, (1024, 1024), (128, 128)),
    "gsm8k-like": _uniform(1319, (60, 130), (256, 256)),
    "shared-prefix": _shared_prefix,
    "grpo": _grpo,
}


def make_workload(name: str, vocab_size: int, limit: int | None = None) -> Workload:
    """The workload ``name`` (or W1..W6) of BENCHMARKS.md: seeded with Random(0), token ids
    uniform in [100, vocab_size - 100). ``limit``: only the first prompts (smoke runs)."""
    rng = random.Random(0)
    wl = WORKLOADS[ALIASES.get(name, name)](rng, lambda: rng.randrange(100, vocab_size - 100))
    return wl.head(limit) if limit else wl


def build_model(name: str, dtype: torch.dtype, device: str):
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# -- roofline -----------------------------------------------------------------------------------


def measure_bandwidth(device: str) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.randn(1 << 30, dtype=torch.float32, device=device)  # 4 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src))


def measure_matrix_rate(device: str, dtype: torch.dtype) -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    return 2 * 8192**3 / median_seconds(lambda: a @ b)


def median_seconds(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median of CUDA-event-timed runs of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def roofline_tokens_per_s(model, wl: Workload, bandwidth: float, matrix_rate: float,
                          state_bytes_per_seq: int = 0) -> float:
    """Every request admitted at once. Prefill: 2 x active params x ``wl.prefill_tokens`` of
    matrix work. Decode step k (feeding each active request's k-th output token): read the dense
    weights once, the experts the step's tokens route to (`expert_fraction`), the K/V of every
    active token in the attention layers, and each active request's recurrent state
    (``state_bytes_per_seq``, read and written once); 2 x active params x active requests of
    matrix work; the larger time wins."""
    cfg = model.config.get_text_config(decoder=True)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    num_experts = next((getattr(cfg, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(cfg, k, None)), 0)
    top_k = getattr(cfg, "num_experts_per_tok", 0) or 0
    active_params = params - expert_params + (expert_params * top_k / num_experts if expert_params else 0)
    elem = next(model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    attention_layers = sum(t in ("full_attention", "sliding_attention", "hybrid") for t in layer_types)
    kv_per_token = 2 * attention_layers * cfg.num_key_value_heads * head_dim * elem
    prefill = wl.prompt_tokens if wl.prefill_tokens is None else wl.prefill_tokens
    total = 2 * active_params * prefill / matrix_rate
    prompt_lens = [len(p) for p in wl.prompts for _ in range(wl.n)]
    by_len = sorted(zip(wl.completion_lens, prompt_lens))
    active_ctx = sum(prompt_lens)  # tokens in the cache of the active requests
    active = len(by_len)
    i = 0
    for k in range(1, max(wl.output_lens)):
        while i < len(by_len) and by_len[i][0] <= k:  # requests with k outputs are done
            active -= 1
            active_ctx -= by_len[i][1] + by_len[i][0] - 1
            i += 1
        active_ctx += active  # this step's token joins the context of every active request
        weights = (params - expert_params + expert_params * expert_fraction(num_experts, top_k, active)) * elem
        step_bytes = weights + active_ctx * kv_per_token + 2 * active * state_bytes_per_seq
        total += max(step_bytes / bandwidth, 2 * active_params * active / matrix_rate)
    return wl.output_tokens / total


def expert_fraction(num_experts: int, top_k: int, tokens: int) -> float:
    """The expected share of a layer's experts that ``tokens`` tokens route to, each to ``top_k``
    of ``num_experts`` uniformly (all of them once a batch is large)."""
    if not num_experts:
        return 0.0
    return 1 - (1 - top_k / num_experts) ** tokens
