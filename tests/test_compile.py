"""The compiled forward (CPU, float32, ``aot_eager``): hf_cb's attention is one opaque op
(`hf_cb::paged_attention`), so `torch.compile` traces the whole model as one graph. With
``fullgraph=True`` any graph break fails the run, and greedy output still equals stock
`model.generate` token for token."""

from functools import partial

import pytest
import torch
import torch._dynamo
from conftest import random_prompts, reference_generate, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

import hf_cb
import hf_cb.engine.llm_engine
from hf_cb.performance.compile import compile_forward

PROMPTS = random_prompts(6, 1, 40, seed=3)
MAX_NEW = 8


@pytest.fixture
def compile_counter(monkeypatch):
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(hf_cb.engine.llm_engine, "compile_forward",
                        partial(compile_forward, backend=counter, fullgraph=True))
    torch._dynamo.reset()
    torch._dynamo.utils.compilation_time_metrics.clear()
    yield counter
    torch._dynamo.reset()


@pytest.mark.parametrize("fuse", [False, True], ids=["own-projections", "fused-projections"])
@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2: soft-cap and sliding-window layers
def test_compiled_forward_is_one_graph_and_equals_generate(name, fuse, compile_counter):
    model = tiny_model(name)
    refs = [reference_generate(model, p, max_new_tokens=MAX_NEW, do_sample=False) for p in PROMPTS]
    config = hf_cb.EngineConfig(compile=True, page_size=8, max_num_batched_tokens=64, fuse_projections=fuse)
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=config)
    assert [o.token_ids for o in outs] == refs
    # Two specialisations of the forward (one token, several; no graphs on CPU) and whatever
    # else Transformers compiles, then none: other prompts and lengths reuse them. (Before step
    # sizes 0 and 1 were padded away and duck sizing turned off, this was 5 to 6.)
    compiled = compile_counter.frame_count
    assert 0 < compiled <= 4
    # Each frame traced once: no second attempt after a restarted analysis (a float traced as a
    # symbol did that to the whole forward).
    assert "compile_attempt_1" not in torch._dynamo.utils.compilation_time_metrics
    more = random_prompts(5, 50, 90, seed=4)
    outs = model.generate_batch_continuous(more, max_new_tokens=3, do_sample=False, engine_config=config)
    assert [o.token_ids for o in outs] == [reference_generate(model, p, max_new_tokens=3, do_sample=False)
                                           for p in more]
    assert compile_counter.frame_count == compiled


def test_paged_attention_outside_a_step_raises():
    q = torch.zeros(2, 4, 8)
    with pytest.raises(RuntimeError, match="only inside an engine step"):
        torch.ops.hf_cb.paged_attention(q, q[:, :2], q[:, :2], 0, 1.0, None, None, None)


def test_compile_is_the_engines_choice_by_default():
    """``compile=None`` compiles only where decode steps replay from CUDA graphs: not on CPU."""
    model = tiny_model("llama")
    assert hf_cb.get_engine(model, hf_cb.EngineConfig()).forward is model
    hf_cb.release(model)
    assert hf_cb.get_engine(model, hf_cb.EngineConfig(compile=True)).forward is not model
    hf_cb.release(model)


@pytest.mark.parametrize("embed_outside", [False, True])
@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2 scales its embeddings in the forward
def test_embedding_outside_the_compiled_forward(name, embed_outside, monkeypatch):
    """With Inductor on CUDA the tokens are looked up before the compiled forward, which gets
    ``inputs_embeds`` (Inductor's tuning of the lookup fused into the first norm varied between
    processes): the graph holds no embedding, and the output is unchanged."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(hf_cb.engine.llm_engine, "compile_forward",
                        partial(compile_forward, backend=counter, embed_outside=embed_outside))
    torch._dynamo.reset()
    model = tiny_model(name)
    refs = [reference_generate(model, p, max_new_tokens=MAX_NEW, do_sample=False) for p in PROMPTS]
    config = hf_cb.EngineConfig(compile=True, page_size=8, max_num_batched_tokens=64)
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=config)
    assert [o.token_ids for o in outs] == refs
    targets = {node.target for graph in counter.graphs for node in graph.graph.nodes}
    assert (torch.nn.functional.embedding in targets) == (not embed_outside)
    torch._dynamo.reset()
