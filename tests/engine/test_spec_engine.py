"""Speculative steps behave as plain ones at the request's edges: stop ids and strings, max_tokens,
max_model_len, logprobs, streaming, seeded sampling, requests that turn speculation off; the verify graphs'
padding; and a long mixed run leaves no KV block behind."""

from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.spec.verify import VerifyGraphs

ENGINE = dict(dtype="float64", max_model_len=128, num_kvcache_blocks=96, kvcache_block_size=16, max_num_seqs=16)
PROMPTS = [[(7 * i + j) % 900 + 3 for j in range(12)] * 2 for i in range(8)]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 32, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def plain_llm(tiny_model):
    with LLM(str(tiny_model), **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def spec_llm(tiny_model):
    """The target as its own draft: every draft is kept, so each step emits k + 1 tokens and the stops fall
    inside accepted runs."""
    spec = {"method": "draft_model", "model": str(tiny_model), "num_speculative_tokens": 4, "max_batch_size": 16}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        yield llm


def assert_no_leak(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()
    for h, b in bm.cached.items():  # every cached block holds the tokens its hash names
        assert bm.blocks[b].hash == h


def first_new_token(outputs: list[list[int]], at_least: int = 3) -> tuple[int, int, int]:
    """(prompt index, position, token): a token whose first occurrence in its output is at >= at_least."""
    for i, out in enumerate(outputs):
        for pos in range(at_least, len(out)):
            if out[pos] not in out[:pos]:
                return i, pos, out[pos]
    pytest.skip("the random model repeats one token everywhere")


def test_stop_token_inside_accepted_drafts(plain_llm, spec_llm):
    base = [r["token_ids"] for r in plain_llm.generate(PROMPTS, greedy())]
    i, pos, token = first_new_token(base)
    p = greedy(stop_token_ids=[token])
    want = plain_llm.generate([PROMPTS[i]], p)[0]
    got = spec_llm.generate([PROMPTS[i]], p)[0]
    assert got == want and got["token_ids"] == base[i][:pos + 1] and got["finish_reason"] == "stop"
    assert_no_leak(spec_llm)


def test_stop_string(plain_llm, spec_llm):
    base = plain_llm.generate(PROMPTS, greedy())
    i, r = next((i, r) for i, r in enumerate(base) if len(r["text"]) > 12)
    stop = r["text"][6:9]
    for include in (False, True):
        p = greedy(stop=[stop], include_stop_str_in_output=include)
        assert spec_llm.generate([PROMPTS[i]], p) == plain_llm.generate([PROMPTS[i]], p)
    assert_no_leak(spec_llm)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 6, 7, 11])
def test_max_tokens(plain_llm, spec_llm, max_tokens):
    p = greedy(max_tokens=max_tokens)
    got = spec_llm.generate(PROMPTS[:3], p)
    assert got == plain_llm.generate(PROMPTS[:3], p)
    assert all(len(r["token_ids"]) == max_tokens and r["finish_reason"] == "length" for r in got)
    assert_no_leak(spec_llm)


def test_max_model_len(plain_llm, spec_llm):
    prompt = PROMPTS[0] * 5  # 120 of the 128 positions
    p = greedy(max_tokens=64)
    got = spec_llm.generate([prompt], p)[0]
    assert got == plain_llm.generate([prompt], p)[0] and len(got["token_ids"]) == 8
    assert_no_leak(spec_llm)


def test_logprobs(plain_llm, spec_llm):
    p = greedy(logprobs=2, max_tokens=12)
    got, want = spec_llm.generate(PROMPTS[:2], p), plain_llm.generate(PROMPTS[:2], p)
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"] and len(g["logprobs"]) == 12
        for a, b in zip(g["logprobs"], w["logprobs"]):
            assert a["token_logprob"] == pytest.approx(b["token_logprob"], abs=1e-9)
            assert list(a["top"]) == list(b["top"])


def test_streaming(spec_llm, plain_llm):
    p = greedy(max_tokens=13)
    chunks = list(spec_llm.stream(PROMPTS[:3], p))
    want = plain_llm.generate(PROMPTS[:3], p)
    for i in range(3):
        mine = [c for c in chunks if c["index"] == i]
        assert [t for c in mine for t in c["token_ids"]] == want[i]["token_ids"]
        assert "".join(c["text"] for c in mine) == want[i]["text"]
        assert [c["finished"] for c in mine] == [False] * (len(mine) - 1) + [True]
    assert max(len(c["token_ids"]) for c in chunks) > 1  # several tokens per step
    assert_no_leak(spec_llm)


def test_seeded_sampling_reproducible(spec_llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    assert spec_llm.generate(PROMPTS[:2], p) == spec_llm.generate(PROMPTS[:2], p)


def test_adjusted_requests_decode_plainly(plain_llm, spec_llm):
    """Penalties and biases change the logits between tokens: such requests are never drafted for (alone they
    decode plainly), and beside drafted requests they get the tokens plain decoding gives them."""
    totals = spec_llm.engine.speculator.totals
    before = totals.num_drafts
    p = greedy(repetition_penalty=1.3, max_tokens=10)
    assert spec_llm.generate(PROMPTS[:2], p) == plain_llm.generate(PROMPTS[:2], p)
    assert totals.num_drafts == before
    mixed = [greedy(max_tokens=12), greedy(repetition_penalty=1.3, max_tokens=12), greedy(max_tokens=12),
             greedy(logit_bias={PROMPTS[3][0]: 5.0}, max_tokens=12)]
    assert spec_llm.generate(PROMPTS[:4], mixed) == plain_llm.generate(PROMPTS[:4], mixed)
    assert totals.num_drafts > before
    bm = spec_llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_structured_output_beside_drafted_requests(plain_llm, spec_llm):
    """A grammar-constrained request is never drafted for; its greedy JSON is what plain decoding gives, and
    the requests beside it still speculate."""
    from nanovllm.structured import StructuredOutput

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    mixed = [greedy(max_tokens=20), SamplingParams(temperature=0.0, max_tokens=40,
                                                   structured=StructuredOutput(json=schema))]
    before = spec_llm.engine.speculator.totals.num_drafts
    got = spec_llm.generate(PROMPTS[:2], mixed)
    assert got == plain_llm.generate(PROMPTS[:2], mixed) and got[1]["finish_reason"] == "stop"
    assert spec_llm.engine.speculator.totals.num_drafts > before
    assert_no_leak(spec_llm)


def test_prompt_logprobs_and_full_prefix_hits(plain_llm, spec_llm):
    """A prompt seen before is a full prefix-cache hit: its one uncomputed token starts a speculative step.
    Prompt logprobs come out as without speculation."""
    p = greedy(max_tokens=10, prompt_logprobs=1)
    for _ in range(2):
        got, want = spec_llm.generate(PROMPTS[5:7], p), plain_llm.generate(PROMPTS[5:7], p)
        for g, w in zip(got, want):
            assert g["token_ids"] == w["token_ids"]
            assert [x and x["token_logprob"] for x in g["prompt_logprobs"]] == pytest.approx(
                [x and x["token_logprob"] for x in w["prompt_logprobs"]])
    assert spec_llm.generate(PROMPTS[5:7], greedy(max_tokens=10)) == plain_llm.generate(PROMPTS[5:7],
                                                                                         greedy(max_tokens=10))
    assert_no_leak(spec_llm)


def test_usage_counts(spec_llm):
    outs = []
    engine = spec_llm.engine
    rid = engine.add_request(PROMPTS[0], greedy(max_tokens=21))
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    last = outs[-1]
    assert last.finished and last.spec_steps == 4 and last.spec_accepted_tokens == last.spec_draft_tokens == 16


def test_verify_graph_padding(tiny_model, plain_llm):
    """The verify graphs' padded layout (k + 1 rows per sequence, padding rows on the scratch block), run
    eagerly: same tokens as plain decoding."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "max_batch_size": 4}
    with LLM(str(tiny_model), speculative_config=spec, **ENGINE) as llm:
        s = llm.engine.speculator
        s.graphs = VerifyGraphs(llm.engine.runner, s.k, 4, capture_graphs=False, proposer=s.proposer)
        p = greedy(max_tokens=30)
        assert llm.generate(PROMPTS[:3], p) == plain_llm.generate(PROMPTS[:3], p)
        assert s.graphs.ready and s.totals.num_drafts > 0
        assert_no_leak(llm)


def test_long_mixed_run_leaks_nothing(tiny_model):
    """Greedy, sampled, penalised and logprob requests of many lengths, aborts, preemption (a small cache)
    and prefix sharing, with speculation on and off as the batch size changes."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "max_batch_size": 4}
    rng = random.Random(3)
    with LLM(str(tiny_model), speculative_config=spec, **{**ENGINE, "num_kvcache_blocks": 24}) as llm:
        engine = llm.engine
        for round_ in range(3):
            ids = []
            for _ in range(12):
                kind = rng.choice(["greedy", "sampled", "penalty", "logprobs"])
                extra = {"sampled": dict(temperature=1.0, top_k=20), "penalty": dict(presence_penalty=0.5),
                         "logprobs": dict(logprobs=1)}.get(kind, {})
                prompt = PROMPTS[rng.randrange(8)][: rng.randrange(4, 24)]
                ids.append(engine.add_request(prompt, greedy(max_tokens=rng.randrange(1, 40), **extra)))
            steps = 0
            while engine.has_unfinished():
                engine.step()
                steps += 1
                if steps == 5 + round_:
                    engine.abort_request(ids[0])
                    engine.abort_request(ids[5])
        assert engine.speculator.totals.num_drafts > 0
        assert_no_leak(llm)


def test_steps_without_drafts_run_ahead(tiny_model, plain_llm):
    """While prompt lookup finds nothing, plain decode steps run ahead of the tokens in flight (async scheduling
    through the decode graphs, replayed eagerly here); once a lookup finds a draft the batch speculates again.
    The tokens stay those of plain decoding."""
    from nanovllm.engine.cuda_graphs import DecodeGraphs

    spec = {"method": "ngram", "num_speculative_tokens": 3, "max_batch_size": 4}
    with LLM(str(tiny_model), speculative_config=spec, async_scheduling=True, **ENGINE) as llm:
        runner, s = llm.engine.runner, llm.engine.speculator
        runner.graphs = DecodeGraphs(runner, runner.forward, capture_graphs=False)
        runner.graphs.capture()
        s.graphs = VerifyGraphs(runner, s.k, 4, capture_graphs=False, proposer=s.proposer)
        ahead = []
        launch = runner.launch
        runner.launch = lambda batch, prev=None: ahead.append(prev is not None) or launch(batch, prev)
        prompts = [list(range(40 + 50 * i, 60 + 50 * i)) for i in range(3)]  # no n-gram repeats at first
        p = greedy(max_tokens=40)
        assert llm.generate(prompts, p) == plain_llm.generate(prompts, p)
        assert any(ahead) and s.totals.num_drafts > 0
        assert_no_leak(llm)
