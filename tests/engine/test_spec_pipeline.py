"""Pipelined verify steps (greedy rows, a cheap proposer, captured verify steps: replayed eagerly here): each step
is launched before the one in flight is read, laid out as if that one kept all its drafts (or none, where they
rest on a refuted guess), and moved on the device by the drafts it actually kept. The tokens stay those of plain
decoding, at the request's edges too, and no KV block is left behind."""

from __future__ import annotations

import pytest

from nanovllm import LLM
from nanovllm.engine.spec.verify import VerifyGraphs
from tests.engine.test_spec_engine import ENGINE, PROMPTS, greedy


@pytest.fixture(scope="module")
def plain_llm(tiny_model):
    with LLM(str(tiny_model), **ENGINE) as llm:
        yield llm


def pipelined(tiny_model, method: str, **spec):
    """An engine whose verify steps replay eagerly through VerifyGraphs, and a list of the `assumed` argument of
    each verify launch (None: a step launched after the one before was read)."""
    config = {"method": method, "num_speculative_tokens": 3, "max_batch_size": 4, **spec}
    llm = LLM(str(tiny_model), speculative_config=config, **ENGINE)
    s = llm.engine.speculator
    s.graphs = VerifyGraphs(llm.engine.runner, s.k, 4, capture_graphs=False)
    launches = []
    launch = s.graphs.launch
    s.graphs.launch = lambda seqs, drafts, assumed=None: launches.append(assumed) or launch(seqs, drafts, assumed)
    return llm, launches


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished() and engine.verify_in_flight is None
    for h, b in bm.cached.items():
        assert bm.blocks[b].hash == h


@pytest.mark.parametrize("method", ["ngram", "oracle"])
def test_chained_rows_move_back_and_forward(tiny_model, plain_llm, method):
    """Steps are chained on the step in flight, taken to keep all its drafts, or none when they rest on a refuted
    guess. n-gram on a random model: many drafts are rejected, so rows move back (fewer kept than taken). The
    oracle, every step forced to take none as kept: all are kept, so rows move forward."""
    p = greedy()
    want = plain_llm.generate(PROMPTS[:4], p)
    llm, launches = pipelined(tiny_model, method, prompt_lookup_min=1)
    with llm:
        s = llm.engine.speculator
        shifts = []
        read = s.read

        def record(step, successor=None):
            out = read(step, successor)
            if successor is not None:
                shifts.extend(r.num_accepted - a for r, a in zip(out, successor.assumed))
            return out

        s.read = record
        if method == "oracle":
            for prompt, out in zip(PROMPTS, want):
                s.proposer.remember(prompt, out["token_ids"])
            launch_after = s.launch_after
            s.launch_after = lambda step: setattr(step, "grounded", [False] * len(step.seqs)) or launch_after(step)
        assert llm.generate(PROMPTS[:4], p) == want  # batch 4: one pipelined batch
        if method == "ngram":
            assert [llm.generate([prompt], p)[0] for prompt in PROMPTS[:2]] == want[:2]
        assert sum(a is not None for a in launches) > 5
        assert max(shifts) > 0 if method == "oracle" else min(shifts) < 0
        if method == "ngram":
            assert 0 < s.totals.num_accepted_tokens < s.totals.num_draft_tokens
        assert_no_leak(llm)


@pytest.mark.parametrize("edge", ["stop_token", "max_tokens", "stop_string"])
def test_oracle_chain_ends_where_plain_decoding_does(tiny_model, plain_llm, edge):
    """Every draft kept: each step is chained on the one before, and the request still ends at its stop token,
    stop string or max_tokens, inside a step's kept drafts, with nothing emitted after it."""
    prompt = PROMPTS[3]  # the random model's output turns from one repeated token to another at token 21
    base = plain_llm.generate([prompt], greedy(max_tokens=40))[0]
    text, tokens = base["text"], base["token_ids"]
    turn = next((i for i, t in enumerate(tokens) if t != tokens[0]), None)
    if turn is None or turn < 8:
        pytest.skip("the random model's output has no late turn to stop at")
    at = next(i for i, c in enumerate(text) if c != text[0])
    p = {"stop_token": greedy(stop_token_ids=[tokens[turn]]), "max_tokens": greedy(max_tokens=turn + 2),
         "stop_string": greedy(stop=[text[at - 1:at + 1]])}[edge]
    llm, launches = pipelined(tiny_model, "oracle")
    with llm:
        llm.engine.speculator.proposer.remember(prompt, tokens)
        got = llm.generate([prompt], p)
        assert got == plain_llm.generate([prompt], p)
        assert sum(a is not None for a in launches) >= 2
        assert_no_leak(llm)


def test_abort_while_a_chained_step_is_in_flight(tiny_model, plain_llm):
    p = greedy(max_tokens=30)
    want = plain_llm.generate(PROMPTS[2:4], p)
    llm, launches = pipelined(tiny_model, "oracle")
    with llm:
        engine = llm.engine
        for prompt, out in zip(PROMPTS[2:4], want):
            engine.speculator.proposer.remember(prompt, out["token_ids"])
        ids = [engine.add_request(prompt, p) for prompt in PROMPTS[2:4]]
        got = []
        for _ in range(3):
            got += [o.token_ids for o in engine.step() if o.request_id == ids[1]]
        assert engine.verify_in_flight is not None
        engine.abort_request(ids[0])
        while engine.has_unfinished():
            got += [o.token_ids for o in engine.step() if o.request_id == ids[1]]
        assert sum(got, []) == want[1]["token_ids"]
        assert_no_leak(llm)
