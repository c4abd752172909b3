"""Steps with penalties, logit_bias or min_tokens (ADJUSTED) take their hidden states from the decode graph
and sample outside it; launched ahead (async scheduling), they are sampled once the step before is read, so
the adjustments count every earlier token. Steps without such rows keep the graph's own sampling. Graphs are
replayed eagerly on the CPU (as in tests/engine/test_cuda_graph_path.py)."""

from __future__ import annotations

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_mode import ADJUSTED, GREEDY, LOGPROBS, StepMode


def emulated(path, **kwargs) -> LLM:
    llm = LLM(str(path), dtype="float64", max_model_len=256, num_kvcache_blocks=96, **kwargs)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner, runner.forward, capture_graphs=False)
    runner.graphs.capture()
    return llm


class Graphs:  # holds up to 2 decode rows
    def fits(self, batch):
        return len(batch) <= 2 and all(item.num_new_tokens == 1 and item.completes for item in batch)


def decode(completed: int = 0, **params):
    seq = Sequence([1, 2, 3], SamplingParams(**params))
    seq.token_ids += [4] * completed
    seq.num_computed_tokens = seq.num_tokens - 1
    return ScheduledSeq(seq, 1)


def test_step_mode_of_adjusted_rows():
    greedy = decode(temperature=0)
    with_min = decode(temperature=0, min_tokens=3)
    with_min.seq.min_tokens_stop_ids = frozenset({7})
    reached = decode(2, temperature=0, min_tokens=2)  # two tokens out already: nothing left to mask
    reached.seq.min_tokens_stop_ids = frozenset({7})
    cases = [
        ([greedy, decode(temperature=0, frequency_penalty=0.5)], StepMode(True, ADJUSTED, True)),
        ([greedy, decode(temperature=0.7, repetition_penalty=1.1)], StepMode(True, ADJUSTED, True)),
        ([greedy, decode(temperature=0, logit_bias={5: 3.0})], StepMode(True, ADJUSTED, True)),
        ([greedy, with_min], StepMode(True, ADJUSTED, True)),
        ([greedy, reached], StepMode(True, GREEDY, True)),
        ([greedy, decode(temperature=0, presence_penalty=0.0, repetition_penalty=1.0)], StepMode(True, GREEDY, True)),
        ([decode(temperature=0, logprobs=1, presence_penalty=1.0)], StepMode(True, LOGPROBS, False)),
    ]
    for batch, want in cases:
        assert StepMode.of(batch, Graphs(), True) == want


def test_penalized_rows_through_the_graphs_match_eager(tiny_model, tiny_llm):
    llm = emulated(tiny_model, max_num_seqs=4, async_scheduling=True)
    runner = llm.engine.runner
    prompts = [[5, 6, 7] * 3, [9] * 7, [11, 12] * 5]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, frequency_penalty=1.5,
                             repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True, presence_penalty=1.0)]
    modes, ahead = [], []
    launch_decode, step_mode = runner.launch_decode, runner.step_mode
    runner.step_mode = lambda batch: modes.append(step_mode(batch)) or modes[-1]
    runner.launch_decode = lambda batch, prev=None, mode=None: ahead.append(
        [item.seq.params for item in batch]) or launch_decode(batch, prev, mode)
    got = [r["token_ids"] for r in llm.generate(prompts, params)]
    assert got == [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    assert any(m.graph and m.sampling == ADJUSTED for m in modes)
    assert any(p.penalized for batch in ahead for p in batch)  # adjusted rows ran ahead, with the same tokens

    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3
    ahead.clear()
    got = [r["token_ids"] for r in llm.generate(prompts, plain)]
    assert got == [r["token_ids"] for r in tiny_llm.generate(prompts, plain)]
    assert ahead, "plain greedy decode steps go on running ahead through the graph"


def test_deferred_sampling_is_queued_before_the_other_rows_are_appended(tiny_model, tiny_llm):
    """Reading a step, the engine appends the penalised row's token first, queues the deferred sampling of the
    step in flight (which reads that row's tokens), and only then appends (detokenizes, stop-checks) the rest:
    the GPU samples while the host works."""
    llm = emulated(tiny_model, max_num_seqs=4, async_scheduling=True)
    engine, runner = llm.engine, llm.engine.runner
    prompts = [[5, 6, 7] * 3, [9] * 7, [11, 12] * 5]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5)
              if i == 1 else SamplingParams(temperature=0, max_tokens=10, ignore_eos=True) for i in range(3)]
    events = []
    append, resample = engine._append, runner._resample_adjusted
    engine._append = lambda seq, token, lp: events.append(seq.params.penalized) or append(seq, token, lp)
    runner._resample_adjusted = lambda *a: events.append("sample") or resample(*a)
    got = [r["token_ids"] for r in llm.generate(prompts, params)]
    assert got == [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    assert any(events[i - 1:i + 2] == [True, "sample", False] for i in range(1, len(events) - 1))
