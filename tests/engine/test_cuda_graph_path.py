"""The decode-graph path's padding and buffers, run on the CPU by replaying eagerly on the same buffers;
and the GPU warmup that sizes the KV cache, with the CUDA memory calls stubbed."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from nanovllm.engine.teacher_forcing import teacher_forced_logits


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def emulated(path, capture=None, **kwargs) -> LLM:
    """An engine whose decode graphs replay eagerly; `capture`: the batch sizes captured (default: all)."""
    llm = LLM(str(path), dtype="float64", max_model_len=256, num_kvcache_blocks=96, **kwargs)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner, runner.forward, capture_graphs=False)
    runner.graphs.capture(capture)
    return llm


def test_padded_decode_batches_match_eager(tiny_model, tiny_llm):
    llm = emulated(tiny_model, max_num_seqs=6)  # sizes 1, 2, 4, 6: batches of 3 and 5 are padded
    prompts = [[i + 1] * (5 + 7 * i) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    calls = []
    run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda batch, prev=None: calls.append(len(batch)) or run(batch, prev)
    assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
    assert calls and max(calls) == 5  # decode steps went through the padded path
    # Sampled and logprob rows are redone from the graph's hidden states.
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, logprobs=1)
    assert llm.generate(prompts[:3], seeded)[1]["token_ids"] == tiny_llm.generate(prompts[:3], seeded)[1]["token_ids"]


def test_short_context_graphs(tiny_model, tiny_llm):
    """Small batches replay the narrow-table graph while every row's blocks fit it, the full one after; the
    tokens stay the eager engine's across the switch. Larger batches have only the full width."""
    llm = emulated(tiny_model, max_num_seqs=12, short_context_graphs=40)  # 3 blocks of 16 tokens; full: 16
    graphs = llm.engine.runner.graphs
    assert graphs.widths(1) == graphs.widths(8) == [3, 16] and graphs.widths(12) == [16]
    widths = []
    meta = graphs._meta
    graphs._meta = lambda b, w, host, t: widths.append((b, w)) or meta(b, w, host, t)
    prompts = [[i + 3] * (20 + 9 * i) for i in range(3)]  # 20..38 tokens: 2-3 blocks, then growing past 48
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
    assert (4, 3) in widths and (4, 16) in widths and widths.index((4, 3)) < widths.index((4, 16))
    many = [[5] * 10] * 10  # a batch of 10 pads to 12: full width though every row fits 3 blocks
    widths.clear()
    llm.generate(many, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert {w for b, w in widths if b == 12} == {16}


def test_padded_decode_logits_match(tiny_model, tiny_llm):
    llm = emulated(tiny_model, max_num_seqs=4)
    prompt, forced = list(range(300, 340)), [9, 8, 7, 6, 5]
    torch.testing.assert_close(teacher_forced_logits(llm.engine, prompt, forced),
                               teacher_forced_logits(tiny_llm.engine, prompt, forced))


def test_warmup_peak_runs_the_largest_step(tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), max_model_len=64, num_kvcache_blocks=8, max_num_seqs=3, max_num_batched_tokens=150)
    runner = llm.engine.runner
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 350)
    seen = []
    forward = runner.forward
    runner.forward = lambda ids, pos, meta: seen.append(meta.host["seq_lens"].tolist()) or forward(ids, pos, meta)
    assert runner._warmup_peak() == 250
    # two prompts of max_model_len - 1 fill the 150-token budget; then a decode step of the largest graph
    # batch (max_num_seqs) over full-length block tables, the shape graphs are captured at
    # (after decode steps of 1 and 3 rows that let per-row-count kernels tune before the KV cache exists)
    assert seen == [[16], [16, 16, 16], [63, 63], [64, 64, 64]]
    assert runner.kv_cache is None


def test_async_scheduling_gives_the_same_tokens(tiny_model, tiny_llm):
    """Decode steps launched one ahead (inputs taken from the in-flight step's tokens) give exactly the
    tokens of the synchronous engine: through max_tokens, EOS and stop-string stops mid-batch, aborts,
    and requests arriving while steps are in flight. Every block is free afterwards."""
    llm = emulated(tiny_model, max_num_seqs=6, async_scheduling=True)
    engine = llm.engine
    prompts = [[i + 3] * (4 + 9 * i) for i in range(5)]
    lengths = [3, 17, 9, 25, 1]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    launched, ahead_rows = [], []
    launch = engine.runner.launch_decode

    def spy(batch, prev=None, mode=None):
        launched.append(prev is not None)
        if prev is not None:
            ahead_rows.append(len(batch))
        return launch(batch, prev, mode)

    engine.runner.launch_decode = spy
    graphs, skipped_ids = engine.runner.graphs, []
    copy = graphs.buffers.copy
    graphs.buffers.copy = lambda t, b, w, skip_ids=False: skipped_ids.append(skip_ids) or copy(t, b, w, skip_ids)
    gathered, upload_kept = [], graphs.buffers._upload_kept
    graphs.buffers._upload_kept = lambda t, b, w, tokens, n: gathered.append(n) or upload_kept(t, b, w, tokens, n)
    assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
    assert any(launched), "no step was launched ahead"
    # every row kept: the input ids are where the last graph wrote its tokens; a row dropped: the kept rows'
    # tokens are gathered there on the device (KeptRows); only the first decode step copies them from the host
    assert skipped_ids.count(True) > 0 and skipped_ids.count(False) == 1, skipped_ids
    assert {3, 2, 1} <= set(gathered), gathered
    # requests finish at different lengths: steps go on being launched ahead without the finishing rows, so
    # only the first decode step is launched synchronously
    assert launched.count(False) == 1 and {4, 3, 2, 1} <= set(ahead_rows), (launched, ahead_rows)

    # Sampled rows (per-request seeds) mixed with greedy ones: sampled after the graph, still launched ahead.
    mixed = [SamplingParams(temperature=0.9 if i % 2 else 0, seed=i, max_tokens=n, ignore_eos=True)
             for i, n in enumerate(lengths)]
    launched.clear()
    assert ([r["token_ids"] for r in llm.generate(prompts, mixed)]
            == [r["token_ids"] for r in tiny_llm.generate(prompts, mixed)])
    assert any(launched)

    # A token treated as EOS stops one request while the next step for it is already in flight.
    stop_at = expected[3][5]
    engine.eos_ids.add(stop_at)
    tiny_llm.engine.eos_ids.add(stop_at)
    try:
        eos_params = [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
        assert ([r["token_ids"] for r in llm.generate(prompts, eos_params)]
                == [r["token_ids"] for r in tiny_llm.generate(prompts, eos_params)])
    finally:
        engine.eos_ids.discard(stop_at)
        tiny_llm.engine.eos_ids.discard(stop_at)

    # An abort and a new request while a step is in flight.
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in prompts]
    got = {i: [] for i in ids}
    late, steps = None, 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
        steps += 1
        if steps == 4:
            engine.abort_request(ids[2])
            late = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
            got[late] = []
    solo = [r["token_ids"] for r in tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20,
                                                                               ignore_eos=True))]
    assert [got[i] for i in (ids[0], ids[1], ids[3], ids[4])] == [solo[0], solo[1], solo[3], solo[4]]
    assert got[late] == solo[0][:7]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests


def test_async_scheduling_writes_the_same_kv_cache(tiny_model):
    """Tokens of a random tiny model hardly depend on positions, so compare what the steps wrote: the
    K/V of every position, bit for bit (float64), with and without steps launched ahead."""
    caches = []
    for overlap in (False, True):
        llm = emulated(tiny_model, max_num_seqs=4, async_scheduling=overlap)
        llm.generate([list(range(500, 537)), list(range(900, 913))],
                     SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))
        caches.append(torch.stack([t for kv in llm.engine.runner.kv_cache for t in kv]))
    assert caches[0].abs().sum() > 0
    assert torch.equal(caches[0], caches[1])


def test_step_ahead_feeds_the_in_flight_tokens(tiny_model):
    """A step launched ahead reads its input ids from the device tokens of the step in flight and runs one
    position further; everything else comes from the host as usual."""
    from nanovllm.engine.scheduler import ScheduledSeq

    llm = emulated(tiny_model, max_num_seqs=4)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    rid = engine.add_request(list(range(40, 60)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()  # the prefill
    seq = engine.requests[rid][0]
    engine.block_manager.grow(seq, seq.num_tokens + 1)
    graphs.run([ScheduledSeq(seq, 1)], prev_tokens=torch.tensor([777]))
    buffers = graphs.buffers
    views = buffers.views(buffers.inputs[buffers.turn], 1, graphs.max_blocks)
    assert views["input_ids"].tolist() == [777]
    assert views["positions"].tolist() == [seq.num_computed_tokens + 1]
    assert views["seq_lens"].tolist() == [seq.num_computed_tokens + 2]
    engine.abort_request(rid)


def test_graphs_set_aside_while_a_step_is_in_flight(tiny_model, tiny_llm):
    """The profiler's eager reference sets the graphs aside between steps: the step in flight is read,
    nothing more is launched ahead, and the tokens stay those of the synchronous engine."""
    llm = emulated(tiny_model, max_num_seqs=4, async_scheduling=True)
    engine, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rid = engine.add_request(list(range(70, 90)), params)
    got, steps, graphs = [], 0, runner.graphs
    while engine.has_unfinished():
        got += [t for out in engine.step() for t in out.token_ids]
        steps += 1
        if steps == 4:
            assert engine.scheduler.in_flight is not None, "no step in flight to set the graphs aside under"
            runner.graphs = None
        if steps == 8:
            runner.graphs = graphs
    assert got == tiny_llm.generate([list(range(70, 90))], params)[0]["token_ids"]
    assert rid not in engine.requests


def test_temperature_sampling_runs_in_the_sampled_graph(tiny_model, tiny_llm, monkeypatch):
    """Temperature-only batches sample inside the sampled graph (its temperature and noise buffers); batches
    with a filter (top-k here) inside the filtered graph while they are small (FILTERED_MAX_ROWS), else from
    the greedy graph's hidden states outside it. Tokens are the eager engine's every way (seeded rows draw
    their noise from their own generators)."""
    from nanovllm.engine import cuda_graphs

    llm = emulated(tiny_model, max_num_seqs=4)
    modes = []
    run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda batch, prev=None, sampled=False, filtered=False: (
        modes.append("filtered" if filtered else "sampled" if sampled else "greedy") or run(batch, prev, sampled,
                                                                                            filtered))
    prompts = [[7] * 9, [11] * 14, [13] * 5]
    for extra, max_rows, graph_samples in ((dict(), 8, "sampled"), (dict(top_k=5), 8, "filtered"),
                                           (dict(top_k=5), 0, "greedy")):
        monkeypatch.setattr(cuda_graphs, "FILTERED_MAX_ROWS", max_rows)
        params = [SamplingParams(temperature=0.3 + 0.4 * i, seed=i, max_tokens=6, ignore_eos=True, **extra)
                  for i in range(3)]
        modes.clear()
        assert ([r["token_ids"] for r in llm.generate(prompts, params)]
                == [r["token_ids"] for r in tiny_llm.generate(prompts, params)])
        assert modes and set(modes) == {graph_samples}


def test_capture_a_subset_of_sizes_first(tiny_model, tiny_llm):
    """Sizes captured later: a batch replays the smallest captured size that holds it, and runs eagerly
    while none does; the tokens are the eager engine's throughout."""
    llm = emulated(tiny_model, capture=[], max_num_seqs=6)  # sizes 1, 2, 4, 6
    graphs = llm.engine.runner.graphs
    assert not any(graphs.captured(b) for b in graphs.sizes) and not graphs.ready
    with pytest.raises(ValueError, match=r"batch sizes \[3\] are not decode graph sizes"):
        graphs.capture([3])
    sizes = []
    meta = graphs._meta
    graphs._meta = lambda b, w, host, t: sizes.append(b) or meta(b, w, host, t)
    prompts = [[i + 2] * (6 + 5 * i) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 4, 6)]
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    ensure_graph = llm.engine.runner.ensure_graph
    llm.engine.runner.ensure_graph = lambda batch: None  # only the sizes captured here
    for captured, replayed in (([], set()), ([1], {1}), ([6], {1, 6}), ([4], {1, 4})):
        graphs.capture(captured)
        sizes.clear()
        assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
        assert set(sizes) == replayed, (captured, sizes)  # decode steps of 3, 2 and 1 rows
    assert graphs.ready == [1, 4, 6] and graphs.captured(4) and not graphs.captured(2)
    llm.engine.runner.ensure_graph = ensure_graph


def test_batch_sizes_are_captured_when_first_needed(tiny_model, tiny_llm):
    """With nothing captured, the first decode step of three rows captures size 4 (the smallest that holds it)
    before it launches; smaller batches of the same requests replay it; the tokens are the eager engine's."""
    llm = emulated(tiny_model, capture=[], max_num_seqs=6)  # sizes 1, 2, 4, 6
    graphs = llm.engine.runner.graphs
    prompts = [[i + 2] * (6 + 5 * i) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 4, 6)]
    expected = [r["token_ids"] for r in tiny_llm.generate(prompts, params)]
    assert [r["token_ids"] for r in llm.generate(prompts, params)] == expected
    assert 4 in graphs.ready and 6 not in graphs.ready
    llm.capture_cuda_graphs()
    assert graphs.ready == graphs.sizes


def test_step_mode():
    from nanovllm.engine.scheduler import ScheduledSeq
    from nanovllm.engine.sequence import Sequence
    from nanovllm.engine.step_mode import FILTERED, GREEDY, LOGPROBS, SAMPLED, StepMode

    class Graphs:  # holds up to 2 decode rows
        def fits(self, batch):
            return len(batch) <= 2 and all(item.num_new_tokens == 1 and item.completes for item in batch)

    def decode(**params):
        seq = Sequence([1, 2, 3], SamplingParams(**params))
        seq.num_computed_tokens = 2
        return ScheduledSeq(seq, 1)

    greedy, hot = decode(temperature=0), decode(temperature=0.7)
    cases = [
        ([greedy], Graphs(), True, StepMode(True, GREEDY, True)),
        ([greedy, hot], Graphs(), True, StepMode(True, SAMPLED, True)),
        ([greedy, decode(temperature=0.7, top_p=0.9)], Graphs(), True, StepMode(True, FILTERED, True)),
        ([decode(temperature=0, top_k=5)], Graphs(), True, StepMode(True, GREEDY, True)),  # greedy: no filter
        ([hot, decode(temperature=0, logprobs=2)], Graphs(), True, StepMode(True, LOGPROBS, False)),
        ([greedy], Graphs(), False, StepMode(True, GREEDY, False)),  # async scheduling off
        ([greedy] * 3, Graphs(), True, StepMode(False, GREEDY, False)),  # no graph holds 3 rows
        ([greedy], None, True, StepMode(False, GREEDY, False)),  # eager engine
        ([ScheduledSeq(Sequence([1, 2, 3], SamplingParams()), 3)], Graphs(), True,
         StepMode(False, SAMPLED, False)),  # a prefill
    ]
    for batch, graphs, async_scheduling, want in cases:
        assert StepMode.of(batch, graphs, async_scheduling) == want
