"""The sample op (greedy, temperature, top-k, top-p, min-p) and per-request seeds through the engine."""

from __future__ import annotations

import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.ops import get_op

sample = get_op("sample").native


def draw(logits, n, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1)
    full = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt)  # noqa: E731
    noise = torch.empty(rows.shape).exponential_(generator=g)
    return sample(rows, full(temperature), full(top_k, torch.int64), full(top_p), full(min_p), noise)


def frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax_without_noise():
    logits = torch.randn(5, 33)
    zeros = torch.zeros(5)
    assert torch.equal(sample(logits, zeros, zeros.long(), zeros + 1, zeros, None), logits.argmax(-1))


def test_temperature_sampling_matches_softmax():
    for t in (0.7, 1.0, 1.8):
        f = frequencies(draw(LOGITS, 40000, temperature=t), 6)
        torch.testing.assert_close(f, (LOGITS[0] / t).softmax(-1), atol=0.01, rtol=0)


def test_top_k_top_p_min_p_filters():
    probs = LOGITS[0].softmax(-1)
    f = frequencies(draw(LOGITS, 20000, top_k=2), 6)
    torch.testing.assert_close(f[:2], probs[:2] / probs[:2].sum(), atol=0.015, rtol=0)
    assert f[2:].sum() == 0
    # top_p: the smallest prefix whose mass reaches p (masses 0.56, 0.77, 0.89: 0.5 -> 1 token, 0.75 -> 2).
    assert frequencies(draw(LOGITS, 2000, top_p=0.5), 6)[0] == 1
    f = frequencies(draw(LOGITS, 5000, top_p=0.75), 6)
    assert f[2:].sum() == 0 and f[1] > 0
    # min_p: tokens below min_p * p(max) are dropped.
    keep = probs >= 0.2 * probs.max()
    f = frequencies(draw(LOGITS, 5000, min_p=0.2), 6)
    assert (f[~keep] == 0).all() and (f[keep] > 0).all()


def test_mixed_rows_greedy_and_sampled():
    logits = torch.randn(4, 50)
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0])
    noise = torch.empty(4, 50).exponential_()
    out = sample(logits, temp, torch.full((4,), -1), torch.ones(4), torch.zeros(4), noise)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_requests_reproduce_in_any_batch(tiny_llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate(["Tell me a story"], seeded)[0]["token_ids"]
    in_batch = tiny_llm.generate(["Hi", "Tell me a story", "Yo"], [other, seeded, other])[1]["token_ids"]
    assert alone == in_batch
    different = SamplingParams(temperature=1.0, seed=4321, max_tokens=10, ignore_eos=True)
    assert tiny_llm.generate(["Tell me a story"], different)[0]["token_ids"] != alone


def test_max_tokens_stop_ids_and_eos(tiny_llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = tiny_llm.generate(["Hello"], greedy)[0]["token_ids"]
    assert len(ids) == 8
    stop_at = ids[3]
    first = ids.index(stop_at)
    out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))[0]
    assert out["token_ids"] == ids[:first + 1] and out["finish_reason"] == "stop"
    # A token treated as EOS ends the request unless ignore_eos is set.
    tiny_llm.engine.eos_ids.add(stop_at)
    try:
        out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))[0]
        assert out["token_ids"] == ids[:first + 1] and out["finish_reason"] == "stop"
        assert tiny_llm.generate(["Hello"], greedy)[0]["token_ids"] == ids
    finally:
        tiny_llm.engine.eos_ids.discard(stop_at)


def test_stop_strings_cut_the_text(tiny_llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = tiny_llm.generate(["Once upon a time"], greedy)[0]
    text = full["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = tiny_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    assert out["text"] == text[:text.index(stop)] and out["finish_reason"] == "stop"
    streamed = "".join(o["text"] for o in tiny_llm.stream(["Once upon a time"],
                                                             SamplingParams(temperature=0, max_tokens=12, stop=stop)))
    assert streamed == out["text"]


def test_detokenize_false_gives_the_same_tokens_without_text(tiny_llm):
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(["Once upon a time", "Hi"], SamplingParams(**greedy))
    ids_only = tiny_llm.generate(["Once upon a time", "Hi"], SamplingParams(**greedy, detokenize=False))
    assert [r["token_ids"] for r in ids_only] == [r["token_ids"] for r in full]
    assert all(r["text"] == "" for r in ids_only) and all(r["text"] for r in full)


def test_logprobs(tiny_llm):
    out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert len(out["logprobs"]) == 3
    for tok, lp in zip(out["token_ids"], out["logprobs"]):
        assert max(lp["top"], key=lp["top"].get) == tok  # greedy picks the most likely token
        assert lp["token_logprob"] == pytest.approx(max(lp["top"].values()))


def test_filters_passed_as_none_skip_the_sort_but_sample_the_same():
    """With no filter in use the sampler takes a sort-free path; it draws exactly what the full path draws."""
    logits = torch.randn(6, 301)
    temp = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.9, 2.0])
    noise = torch.empty(6, 301).exponential_()
    off = sample(logits, temp, torch.full((6,), -1), torch.ones(6), torch.zeros(6), noise)
    assert torch.equal(sample(logits, temp, None, None, None, noise), off)
    assert torch.equal(sample(logits, temp, None, torch.ones(6), None, noise), off)


def test_runner_passes_unused_filters_as_none(tiny_llm):
    from nanovllm.engine.sequence import Sequence

    runner = tiny_llm.engine.runner
    plain = Sequence([1], SamplingParams(temperature=0.7))
    topk = Sequence([1], SamplingParams(temperature=0.7, top_k=5))
    temperature, top_k, top_p, min_p, noise = runner.sampling_tensors([plain, plain])
    assert top_k is None and top_p is None and min_p is None and noise.shape[0] == 2
    _, top_k, top_p, _, _ = runner.sampling_tensors([plain, topk])
    assert top_k.tolist() == [0, 5] and top_p is None
