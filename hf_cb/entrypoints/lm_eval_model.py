"""An lm-evaluation-harness model backed by hf_cb, registered as ``hf_cb``.

It is lm-eval's own ``hf`` backend (`HFLM`: loading, tokenizing, chat templates, truncation,
caching, everything lm-eval's tasks rely on) with its three request types run through the
engine, all of a call's requests in one continuous batch:
- ``loglikelihood`` (and the windows of ``loglikelihood_rolling``): each context and continuation
  as one prompt, scored with prompt log-probabilities (`prompt_logprobs`); a continuation is
  greedy where each of its tokens ranks first;
- ``generate_until``: the contexts, grouped by their generation settings, with their stop
  sequences as stop strings, cut and decoded as ``hf`` cuts and decodes them.

Use ``--model hf_cb`` (``hf-cb eval``, which registers it, or ``lm_eval`` after importing this
module) or ``lm_eval.simple_evaluate(model=HFCBLM(pretrained=model, tokenizer=tokenizer))``.
``model_args`` take `HFLM`'s arguments plus any `EngineConfig` field (``max_num_seqs=64``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

from lm_eval import utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from hf_cb.core.config import EngineConfig
from hf_cb.engine.on_model import get_engine
from hf_cb.generation_mixin import generate_batch_continuous

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


@register_model("hf_cb")
class HFCBLM(HFLM):
    """lm-eval's `HFLM` whose requests run on hf_cb's engine (see the module)."""

    def __init__(self, *args: Any, engine_config: EngineConfig | None = None, **kwargs: Any):
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENGINE_FIELDS}
        super().__init__(*args, **kwargs)
        if self.backend != "causal":
            raise ValueError("hf_cb serves decoder-only (causal) language models")
        self.engine_config = engine_config or (EngineConfig(**given) if given else None)

    def _run(self, prompts: list[list[int]], progress: bool, **kwargs: Any):
        return generate_batch_continuous(self.model, prompts, engine_config=self.engine_config,
                                         progress=progress, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(log-likelihood, is greedy) of each continuation after its context, as `HFLM` scores
        them: the last ``max_length + 1`` tokens of context and continuation (one generated token
        must fit beside them in the engine's context)."""
        if not requests:
            return []
        window = self.max_length + 1
        prompts = [(context + continuation)[-window:] for _, context, continuation in requests]
        longest = max(map(len, prompts))
        engine_len = self._engine_max_len()
        if longest + 1 > engine_len:  # the engine's context holds the prompt and one generated token
            prompts = [p[-(engine_len - 1) :] for p in prompts]
        outs = self._run(prompts, not disable_tqdm, max_new_tokens=1, do_sample=False, prompt_logprobs=0)
        results = []
        for (key, _, continuation), out in zip(requests, outs):
            scored = out.prompt_logprobs[len(out.prompt_logprobs) - len(continuation) :]
            answer = (sum(e.logprob for e in scored), all(e.rank == 1 for e in scored))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _engine_max_len(self) -> int:
        return get_engine(self.model, self.engine_config).max_model_len

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """`HFLM`'s rolling windows, every request's scored in one batch."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's generation up to its stop sequences, as `HFLM.generate_until` gives
        it; the requests of each generation setting in one batch."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str] = [""] * len(requests)
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            if not kwargs.get("do_sample"):
                kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
            contexts = [requests[i].args[0] for i in members]
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]
            stops = [s for s in until if s]
            outs = self._run(prompts, not disable_tqdm, max_new_tokens=max_gen, tokenizer=self.tokenizer,
                             **({"stop_strings": stops} if stops else {}), **kwargs)
            for i, context, out in zip(members, contexts, outs):
                think = self.think_end_token if isinstance(self.think_end_token, str) else None
                text = postprocess_generated_text(self.tok_decode(out.token_ids), until, think)
                results[i] = text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results
