"""CPU, float32: the per-request options of the Transformers entry points against Transformers
itself: a streamer and ``stop_strings`` in the drop-in `generate`, ``stop_strings``, logprobs and
OpenAI's penalties in `generate_batch_continuous`."""

import pytest
import torch
from conftest import byte_tokenizer, random_prompts, reference_generate, tiny_model, word_tokenizer
from transformers import TextIteratorStreamer, TextStreamer

import hf_cb

PROMPTS = random_prompts(6, 3, 40, seed=21)


@pytest.fixture
def enabled():
    model = tiny_model("llama")
    yield model
    hf_cb.disable(model)


def stock_and_ours(model, **kwargs):
    """(stock generate's output, the drop-in's) for the same call; the drop-in must not fall back."""
    stock = model.generate(**kwargs)
    hf_cb.enable(model)
    ours = model.generate(**kwargs)
    assert hf_cb.get_engine(model).num_generated_tokens > 0, "went to stock generate"
    return stock, ours


def test_streamer_gets_what_stock_generate_streams(enabled, capsys):
    tok = word_tokenizer()
    ids = torch.tensor([PROMPTS[0]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    stock_streamer, our_streamer = TextStreamer(tok), TextStreamer(tok)
    stock = enabled.generate(**kwargs, streamer=stock_streamer)
    stock_text = capsys.readouterr().out
    hf_cb.enable(enabled)
    ours = enabled.generate(**kwargs, streamer=our_streamer)
    assert hf_cb.get_engine(enabled).num_generated_tokens > 0  # through hf_cb, not stock generate
    assert torch.equal(ours, stock)
    assert capsys.readouterr().out == stock_text and stock_text.strip()


def test_iterator_streamer_yields_the_decoded_output(enabled):
    tok = byte_tokenizer()
    hf_cb.enable(enabled)
    ids = torch.tensor([PROMPTS[1]])
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = enabled.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                           streamer=streamer)
    pieces = list(streamer)
    assert len(pieces) > 1  # streamed, not handed over at the end
    assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def test_drop_in_stop_strings_equal_stock(enabled):
    tok = byte_tokenizer()
    ids = torch.tensor([PROMPTS[2]])
    full = reference_generate(enabled, PROMPTS[2], max_new_tokens=16, do_sample=False)
    stop = tok.decode(full[4:6])  # text that appears in the greedy output
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                  stop_strings=stop, tokenizer=tok)
    stock, ours = stock_and_ours(enabled, **kwargs)
    assert torch.equal(ours, stock)
    assert ours.shape[1] < ids.shape[1] + 16  # it did stop early


def test_drop_in_runs_transformers_own_stopping_criteria(enabled):
    """A StoppingCriteriaList of Transformers' own criteria (max length, EOS tokens, stop
    strings) runs on the engine, as stock generate runs it; a criterion of other code goes to
    stock generate, with a warning naming it."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria

    tok = byte_tokenizer()
    ids = torch.tensor([PROMPTS[3]])
    full = reference_generate(enabled, PROMPTS[3], max_new_tokens=16, do_sample=False)
    base = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    cases = [
        StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + 5)]),
        StoppingCriteriaList([EosTokenCriteria(full[6])]),  # a token greedy decoding emits: it stops there
        StoppingCriteriaList([StopStringCriteria(tok, [tok.decode(full[0:2])])]),
    ]
    for criteria in cases:
        hf_cb.disable(enabled)
        stock, ours = stock_and_ours(enabled, **base, stopping_criteria=criteria, tokenizer=tok)
        assert torch.equal(ours, stock) and ours.shape[1] < ids.shape[1] + 16, criteria

    class Custom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    generated = hf_cb.get_engine(enabled).num_generated_tokens
    enabled.generate(**base, stopping_criteria=StoppingCriteriaList([Custom()]))
    assert hf_cb.get_engine(enabled).num_generated_tokens == generated  # stock generate ran it


def test_generate_batch_continuous_stop_strings_equal_stock():
    model = tiny_model("llama")
    tok = byte_tokenizer()
    full = reference_generate(model, PROMPTS[0], max_new_tokens=16, do_sample=False)

    def stock(stops):
        return [reference_generate(model, p, max_new_tokens=16, do_sample=False, stop_strings=stops, tokenizer=tok)
                for p in PROMPTS]

    for k in range(2, 12):  # the first pair of output tokens whose text stops stock generate early
        stops = [tok.decode(full[k : k + 2]), "zzz"]
        refs = stock(stops)
        if len(refs[0]) < 16:
            break
    outs = model.generate_batch_continuous(PROMPTS, tokenizer=tok, max_new_tokens=16, do_sample=False,
                                           stop_strings=stops)
    assert [o.token_ids for o in outs] == refs
    assert len(refs[0]) < 16 and outs[0].finish_reason == "stop"
    assert all(o.finish_reason == ("stop" if len(r) < 16 else "length") for o, r in zip(outs, refs))


def test_logprobs_are_the_model_log_softmax():
    model = tiny_model("qwen3")
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=False, logprobs=4)
    for prompt, out in zip(PROMPTS, outs):
        full = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(full).logits[0, len(prompt) - 1 : -1], -1)
        assert len(out.logprobs) == len(out.token_ids)
        for k, lp in enumerate(out.logprobs):
            top = ref[k].topk(4)
            assert lp.token_id == out.token_ids[k] == int(top.indices[0])  # greedy: the top token
            torch.testing.assert_close(lp.logprob, ref[k, lp.token_id].item(), rtol=0, atol=1e-4)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close([v for _, v in lp.top], top.values.tolist(), rtol=0, atol=1e-4)


def test_presence_and_frequency_penalties_follow_openai():
    """OpenAI's definition over the generated tokens: logit[j] -= presence * (count[j] > 0) +
    frequency * count[j]; checked greedily against a step-by-step reference."""
    model = tiny_model("llama")
    prompt, n, presence, frequency = PROMPTS[3], 12, 0.8, 0.6
    out = model.generate_batch_continuous([prompt], max_new_tokens=n, do_sample=False, eos_token_id=None,
                                          presence_penalty=presence, frequency_penalty=frequency)[0]
    tokens = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1]
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.shape[0]).float()
        tokens.append(int((logits - presence * (counts > 0) - frequency * counts).argmax()))
    assert out.token_ids == tokens
    plain = model.generate_batch_continuous([prompt], max_new_tokens=n, do_sample=False, eos_token_id=None)[0]
    assert plain.token_ids != tokens  # the penalties changed something
