"""Penalties, logit_bias, min_tokens, stop strings kept in the output, prompt logprobs and prompt truncation:
the batched tensors against a plain per-row reference, then end to end through the engine (CPU, tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.engine.logits_processing import LogitsAdjustment, apply_penalties
from nanovllm.engine.sequence import Sequence

GREEDY = dict(temperature=0, ignore_eos=True)


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """One row, one token at a time: the OpenAI penalties and vLLM's repetition penalty as written."""
    out = logits.clone().double()
    for t, b in (p.logit_bias or {}).items():  # the bias first, then the penalties (vLLM's order)
        out[t] += b
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def make_seq(prompt, output, params):
    seq = Sequence(prompt, params)
    seq.token_ids += output
    return seq


def test_batched_penalties_match_the_per_row_reference():
    g = torch.Generator().manual_seed(0)
    settings = [dict(), dict(presence_penalty=1.5), dict(frequency_penalty=-0.7), dict(repetition_penalty=1.8),
                dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=0.6),
                dict(repetition_penalty=1.3, logit_bias={3: 100.0, 7: -42.5}), dict(logit_bias={1: 2.5}), dict()]
    vocab, rows = 50, len(settings)
    logits = torch.randn(rows, vocab, generator=g) * 3
    seqs, want = [], []
    for i, kw in enumerate(settings):
        prompt = torch.randint(0, vocab, (8,), generator=g).tolist()
        output = torch.randint(0, vocab, (5 + i,), generator=g).tolist()
        p = SamplingParams(max_tokens=64, **kw)
        seqs.append(make_seq(prompt, output, p))
        want.append(reference(logits[i], prompt, output, p))
    got = LogitsAdjustment.of(seqs, vocab, torch.device("cpu")).apply(logits)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-6, atol=1e-5)
    for plain in (0, rows - 1):  # rows without adjustments are untouched, bit for bit
        assert torch.equal(got[plain], logits[plain].float())


def test_apply_penalties_neutral_values_are_exact():
    logits = torch.randn(3, 20)
    counts = torch.randint(0, 3, (3, 20)).float()
    out = apply_penalties(logits, counts, counts > 0, torch.zeros(3), torch.zeros(3), torch.ones(3))
    assert torch.equal(out, logits)


def test_min_tokens_masks_stop_ids_only_until_reached():
    p = SamplingParams(min_tokens=3, max_tokens=8)
    seq = make_seq([1, 2], [5], p)
    seq.min_tokens_stop_ids = frozenset({4, 9})
    logits = torch.zeros(1, 12)
    out = LogitsAdjustment.of([seq], 12, torch.device("cpu")).apply(logits)
    assert out[0, 4] == -math.inf and out[0, 9] == -math.inf and out[0, 5] == 0
    seq.token_ids += [6, 7]  # three output tokens: nothing is masked any more
    assert LogitsAdjustment.of([seq], 12, torch.device("cpu")) is None


def test_no_adjustment_for_plain_requests():
    assert LogitsAdjustment.of([make_seq([1], [], SamplingParams())], 10, torch.device("cpu")) is None


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                 dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(min_tokens=-1),
                                 dict(min_tokens=20, max_tokens=10), dict(prompt_logprobs=21),
                                 dict(truncate_prompt_tokens=0), dict(include_stop_str_in_output=1)])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# ---- end to end, through the engine -------------------------------------------------------------------
PROMPT = "the cat the cat the cat"


def run(llm, prompt=PROMPT, **kw):
    return llm.generate([prompt], SamplingParams(**{**GREEDY, "max_tokens": 24, **kw}))[0]


def test_neutral_penalties_give_the_unpenalized_tokens(tiny_llm):
    base = run(tiny_llm)
    neutral = run(tiny_llm, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={})
    assert neutral["token_ids"] == base["token_ids"]


def test_frequency_penalty_breaks_a_greedy_repetition_loop(tiny_llm):
    base = run(tiny_llm, max_tokens=40)["token_ids"]
    assert len(set(base)) <= len(base) // 3, "the tiny model should loop on a few tokens when greedy"
    penalized = run(tiny_llm, max_tokens=40, frequency_penalty=2.0)["token_ids"]
    assert len(set(penalized)) > len(set(base))
    assert max(penalized.count(t) for t in set(penalized)) < max(base.count(t) for t in set(base))


def test_penalties_and_bias_change_only_their_own_rows(tiny_llm):
    plain = SamplingParams(**GREEDY, max_tokens=16)
    prompts = [PROMPT, "a b c d", PROMPT]
    alone = [r["token_ids"] for r in tiny_llm.generate(prompts, plain)]
    mixed = tiny_llm.generate(prompts, [plain, SamplingParams(**GREEDY, max_tokens=16, repetition_penalty=1.5),
                                        SamplingParams(**GREEDY, max_tokens=16, presence_penalty=1.0)])
    assert mixed[0]["token_ids"] == alone[0]


def test_only_adjusted_rows_go_through_logits(tiny_llm, monkeypatch):
    """The batch is sampled as if no row were adjusted; only the penalised row's logits are formed, adjusted
    and sampled again."""
    model = tiny_llm.engine.runner.model
    real, rows = model.compute_logits, []
    monkeypatch.setattr(model, "compute_logits", lambda hidden: rows.append(len(hidden)) or real(hidden))
    plain = SamplingParams(**GREEDY, max_tokens=8)
    tiny_llm.generate([PROMPT, "a b c d", PROMPT], [plain, SamplingParams(**GREEDY, max_tokens=8, presence_penalty=1.0),
                                                    SamplingParams(temperature=1.0, seed=2, max_tokens=8)])
    assert rows and set(rows) == {1}


def test_penalties_with_sampling_and_seed_are_reproducible(tiny_llm):
    kw = dict(temperature=0.8, top_k=20, seed=7, ignore_eos=True, max_tokens=16, frequency_penalty=1.0,
              presence_penalty=0.5, repetition_penalty=1.2)
    a = tiny_llm.generate([PROMPT], SamplingParams(**kw))[0]["token_ids"]
    b = tiny_llm.generate([PROMPT], SamplingParams(**kw))[0]["token_ids"]
    assert a == b and len(a) == 16


def test_logit_bias_forces_a_token(tiny_llm):
    out = run(tiny_llm, max_tokens=5, logit_bias={1234: 100.0})["token_ids"]
    assert out == [1234] * 5
    banned = run(tiny_llm)["token_ids"][0]
    assert run(tiny_llm, max_tokens=5, logit_bias={banned: -100.0})["token_ids"][0] != banned


def test_logit_bias_outside_the_vocabulary_is_refused(tiny_llm):
    vocab = tiny_llm.engine.vocab_size
    with pytest.raises(ValueError, match=str(vocab + 5)):
        tiny_llm.generate(["x"], SamplingParams(logit_bias={vocab + 5: 1.0}))


def test_min_tokens_holds_back_eos_and_stop_ids(tiny_llm):
    first = run(tiny_llm, max_tokens=1)["token_ids"][0]
    stopped = run(tiny_llm, ignore_eos=False, stop_token_ids=[first], max_tokens=10)
    assert stopped["token_ids"] == [first] and stopped["finish_reason"] == "stop"
    held = run(tiny_llm, ignore_eos=False, stop_token_ids=[first], max_tokens=10, min_tokens=4)
    assert len(held["token_ids"]) >= 4 and first not in held["token_ids"][:4]


def test_min_tokens_defers_stop_strings(tiny_llm):
    text = run(tiny_llm, max_tokens=12)["text"]
    stop = text[:3].strip() or text[:3]
    early = run(tiny_llm, max_tokens=12, stop=[stop])
    late = run(tiny_llm, max_tokens=12, stop=[stop], min_tokens=6)
    assert len(late["token_ids"]) >= 6 > len(early["token_ids"])


def test_include_stop_str_in_output(tiny_llm):
    text = run(tiny_llm, max_tokens=12)["text"]
    stop = text[4:7]
    cut = run(tiny_llm, max_tokens=12, stop=[stop])["text"]
    kept = run(tiny_llm, max_tokens=12, stop=[stop], include_stop_str_in_output=True)["text"]
    assert kept == cut + stop and text.startswith(kept)


def test_prompt_logprobs_match_a_full_forward_pass(tiny_llm):
    ids = tiny_llm.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    out = tiny_llm.generate([ids], SamplingParams(**GREEDY, max_tokens=2, prompt_logprobs=3))[0]
    plp = out["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    runner = tiny_llm.engine.runner
    seq = Sequence(ids, SamplingParams())
    assert len(ids) <= 16
    seq.block_table = [tiny_llm.engine.block_manager.num_blocks]  # the runner's scratch block, never handed out
    from nanovllm.engine.scheduler import ScheduledSeq

    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare([ScheduledSeq(seq, len(ids))])
        logp = runner.model.compute_logits(runner.forward(input_ids, positions, meta)).float().log_softmax(-1)
    for j in range(1, len(ids)):
        entry = plp[j]
        assert entry["token_logprob"] == pytest.approx(logp[j - 1, ids[j]].item(), abs=1e-6)
        assert entry["rank"] == int((logp[j - 1] > logp[j - 1, ids[j]]).sum()) + 1
        assert list(entry["top"]) == logp[j - 1].topk(3).indices.tolist()


def test_prompt_logprobs_survive_chunked_prefill_and_the_prefix_cache(tiny_model):
    from nanovllm import LLM

    ids = list(range(100, 160))
    with LLM(str(tiny_model), dtype="float64", max_model_len=256, num_kvcache_blocks=64, kvcache_block_size=16,
             max_num_batched_tokens=24, max_num_seqs=4) as llm:
        whole = llm.generate([ids], SamplingParams(**GREEDY, max_tokens=1, prompt_logprobs=1))[0]["prompt_logprobs"]
        # The same prompt again: its blocks are cached now, but prompt logprobs need every position computed.
        again = llm.generate([ids], SamplingParams(**GREEDY, max_tokens=1, prompt_logprobs=1))[0]["prompt_logprobs"]
    assert len(whole) == len(ids) and whole == again


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_llm):
    ids = list(range(200, 240))
    cut = tiny_llm.generate([ids], SamplingParams(**GREEDY, max_tokens=6, truncate_prompt_tokens=10))[0]
    tail = tiny_llm.generate([ids[-10:]], SamplingParams(**GREEDY, max_tokens=6))[0]
    assert cut["token_ids"] == tail["token_ids"]
    long = list(range(100, 100 + 600))  # longer than max_model_len: fits once truncated
    assert len(tiny_llm.generate([long], SamplingParams(**GREEDY, max_tokens=2, truncate_prompt_tokens=20))[0][
        "token_ids"]) == 2
