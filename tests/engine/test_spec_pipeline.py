"""Pipelined verify steps (greedy rows, a cheap proposer, captured verify steps: replayed eagerly here): each step
is launched before the one in flight is read and moved on the device by the drafts that one actually kept. Its
drafts come from the device proposer (n-gram), after the tokens kept, or from the host (the oracle), which takes
the step in flight to keep all its drafts (or none, where they rest on a refuted guess). The tokens stay those of
plain decoding, at the request's edges too, and no KV block is left behind."""

from __future__ import annotations

import pytest

from nanovllm import LLM
from nanovllm.engine.spec.verify import VerifyGraphs
from tests.engine.test_spec_config import scan
from tests.engine.test_spec_engine import ENGINE, PROMPTS, greedy


@pytest.fixture(scope="module")
def plain_llm(tiny_model):
    with LLM(str(tiny_model), **ENGINE) as llm:
        yield llm


def pipelined(tiny_model, method: str, **spec):
    """An engine whose verify steps replay eagerly through VerifyGraphs, and a list of the (assumed, drafts)
    arguments of each verify launch (assumed None: a step launched after the one before was read; drafts None:
    drafted on the device)."""
    config = {"method": method, "num_speculative_tokens": 3, "max_batch_size": 4, **spec}
    llm = LLM(str(tiny_model), speculative_config=config, **ENGINE)
    s = llm.engine.speculator
    s.graphs = VerifyGraphs(llm.engine.runner, s.k, 4, capture_graphs=False, proposer=s.proposer)
    launches = []
    launch = s.graphs.launch
    s.graphs.launch = lambda seqs, drafts, assumed=None: (launches.append((assumed, drafts))
                                                          or launch(seqs, drafts, assumed))
    return llm, launches


def chained(launches) -> int:
    return sum(assumed is not None for assumed, _ in launches)


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished() and engine.verify_in_flight is None
    for h, b in bm.cached.items():
        assert bm.blocks[b].hash == h


def test_device_drafted_steps_follow_the_kept_tokens(tiny_model, plain_llm):
    """n-gram drafts chained steps on the device, after the tokens the step before kept: each step's drafts are
    what a lookup on the sequence's tokens then gives (on a random model, where most drafts are rejected), and
    the output is that of plain decoding. A chain ends at its first step without drafts."""
    p = greedy()
    want = plain_llm.generate(PROMPTS[:4], p)
    llm, launches = pipelined(tiny_model, "ngram", prompt_lookup_min=1)
    with llm:
        s = llm.engine.speculator
        checked, undrafted = [], []
        read = s.read

        def check(step, successor=None):
            tokens, caps, on_device = [list(q.token_ids) for q in step.seqs], s.caps(step.seqs), step.drafts is None
            out = read(step, successor)
            for seq, t, cap, drafts in zip(step.seqs, tokens, caps, step.drafts):
                if on_device and not seq.is_finished:
                    checked.append(drafts == scan(t, cap, 1, s.config.prompt_lookup_max))
            undrafted.append(not any(step.drafts))
            return out

        s.read = check
        assert llm.generate(PROMPTS[:4], p) == want  # batch 4: one pipelined batch
        assert [llm.generate([prompt], p)[0] for prompt in PROMPTS[:2]] == want[:2]
        assert len(checked) > 10 and all(checked)
        assert sum(drafts is None for _, drafts in launches) > 5
        assert sum(undrafted) <= sum(assumed is None for assumed, _ in launches)  # one at most per chain
        assert 0 < s.totals.num_accepted_tokens < s.totals.num_draft_tokens
        assert_no_leak(llm)


@pytest.mark.parametrize("direction", ["back", "forward"])
def test_host_drafted_rows_move_back_and_forward(tiny_model, plain_llm, direction):
    """The oracle drafts chained steps on the host, taking the step in flight to keep all its drafts, or none when
    they rest on a refuted guess. Remembering a continuation with every fourth token wrong, drafts taken as kept
    are rejected, so rows move back; forced to take none as kept, all are kept, so rows move forward."""
    p = greedy()
    want = plain_llm.generate(PROMPTS[:4], p)
    llm, launches = pipelined(tiny_model, "oracle")
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
        for prompt, out in zip(PROMPTS, want):
            tokens = out["token_ids"]
            if direction == "back":
                tokens = [t + 1 if i % 4 == 3 else t for i, t in enumerate(tokens)]
            s.proposer.remember(prompt, tokens)
        if direction == "forward":
            launch_after = s.launch_after
            s.launch_after = lambda step: setattr(step, "grounded", [False] * len(step.seqs)) or launch_after(step)
        assert llm.generate(PROMPTS[:4], p) == want
        assert chained(launches) > 5
        assert max(shifts) > 0 if direction == "forward" else min(shifts) < 0
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
        assert chained(launches) >= 2
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
