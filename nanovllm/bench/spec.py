"""Speculative decoding bench: tok/s with and without speculation at batch 1, the mean accepted length, and the
verify step's cost (one k + 1-token verify step over one 1-token decode step, wall time, and on a GPU also
the steps' kernel time alone), per proposer and workload.

Workloads: `grounded`, real text whose answers copy their input (code edits, summaries that quote their
source: benchmarks/data/spec_grounded.jsonl) with the proposers named by --methods; and `oracle`, the same
prompts with the oracle proposer, which proposes the target's own greedy continuation (as an untimed
speculative runs compute it: `record_oracle`) and so measures the mechanism's overhead apart from any proposer's
quality.

Plain and speculative runs share one engine (same weights, same kernels, same call): the plain run has the
speculator switched off. A draft model gets an engine of its own (its memory is planned before the target's
KV cache), with its own plain run. Rows carry model, method, workload, speedup and gpu, as the baseline's rows.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from nanovllm.config import SpeculativeConfig
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.provenance import REPO
from nanovllm.sampling_params import SamplingParams

log = logging.getLogger("nanovllm")
WORKLOAD = REPO / "benchmarks" / "data" / "spec_grounded.jsonl"
METHODS = ("ngram", "oracle", "draft_model")


def load_prompts(path: Path = WORKLOAD, limit: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows[:limit]]


def encode(llm, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat and llm.tokenizer.chat_template:
        prompts = [llm.apply_chat_template([{"role": "user", "content": p}], enable_thinking=False) for p in prompts]
    return [llm.engine.tokenize(p) for p in prompts]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_batch1(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float, dict]:
    """Each prompt alone, greedy, ending at EOS or max_tokens as a real request does (a small model's text after
    its EOS is a new, ungrounded conversation): (completions, decode tok/s over the tokens after the first,
    acceptance). The clock starts after each request's first token (its prefill), so tok/s is decode speed."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs, tokens, seconds = [], 0, 0.0
    steps = drafted = kept = forward_steps = 0
    for prompt in prompts:
        rid = engine.add_request(prompt, params)
        got, t0 = [], None
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if t0 is None:
                    sync(engine.runner.device)
                    t0, first = time.perf_counter(), len(out.token_ids)
                else:
                    forward_steps += 1  # each later output is one step's tokens
                got += out.token_ids
                if out.finished:
                    steps, drafted, kept = (steps + out.spec_steps, drafted + out.spec_draft_tokens,
                                            kept + out.spec_accepted_tokens)
        sync(engine.runner.device)
        seconds += time.perf_counter() - t0
        tokens += len(got) - first
        outputs.append(got)
    # tokens_per_step: decode tokens per forward step (one token and its kept drafts), the speed-up a verify step
    # as cheap as a decode step would give: the ceiling the proposer and the workload set
    accept = dict(verify_steps=steps, draft_tokens=drafted, accepted_tokens=kept,
                  mean_accepted_length=1 + kept / steps if steps else 1.0,
                  acceptance_rate=kept / drafted if drafted else 0.0,
                  tokens_per_step=tokens / forward_steps if forward_steps else 1.0)
    return outputs, tokens / seconds if seconds else 0.0, accept


def verify_cost(llm, prompt: list[int], k: int, repeats: int) -> dict:
    """Median seconds of a 1-token decode step and of a verify step of k drafts for one sequence (after its
    prompt), and their ratio. Both steps rewrite the same KV slots, so repeating them changes nothing."""
    engine = llm.engine
    spec = engine.speculator
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=k + 8, ignore_eos=True))
    saved, engine.speculator = engine.speculator, None
    try:
        engine.step()  # the prompt, and its first token
        seq = engine.requests[rid][0]
        if not engine.block_manager.grow(seq, seq.num_tokens + k):
            raise RuntimeError("no KV blocks left for the verify-cost measure")
        batch = [ScheduledSeq(seq, 1)]
        engine.runner.ensure_graph(batch)
        drafts = [[seq.token_ids[-1]] * k]

        def timed(fn) -> float:
            times = []
            for _ in range(repeats + 2):
                sync(engine.runner.device)
                t0 = time.perf_counter()
                fn()
                sync(engine.runner.device)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[2:])

        decode_s = timed(lambda: engine.runner.run(batch))
        verify_s = timed(lambda: spec.verify([seq], drafts))
        gpu = {}
        for name, step in (("decode", lambda: engine.runner.run(batch)),
                           ("verify", lambda: spec.verify([seq], drafts))):
            gpu[f"{name}_gpu_ms"], gpu[f"{name}_kernels"] = kernel_ms(step, repeats)
    finally:
        engine.speculator = saved
        engine.abort_request(rid)
    return dict(decode_step_ms=decode_s * 1e3, verify_step_ms=verify_s * 1e3, verify_cost=verify_s / decode_s, **gpu)


def kernel_ms(step, repeats: int, top: int = 12) -> tuple[float | None, dict]:
    """Milliseconds of GPU work per call of `step` (graph replays included): the time the device's kernels and
    copies cover, overlaps counted once (kernels launched with PDL overlap their predecessors), the step's
    device time without the host's, which a synchronous step adds to its wall time. With it, the `top` kernels
    by that time: name -> [launches, µs] per call. (None, {}) on a CPU."""
    if not torch.cuda.is_available():
        return None, {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from nanovllm.bench.profiling import critical_us

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
    except RuntimeError as e:  # a profiler that cannot start (CUPTI in use elsewhere): the row goes without
        log.warning("no kernel times for the spec bench: %s", e)
        return None, {}
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    critical = critical_us(device)
    kernels: dict[str, list[float]] = {}
    for e in device:
        entry = kernels.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1 / repeats
        entry[1] += critical[id(e)] / repeats
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    return sum(critical.values()) / 1e3 / repeats, {name: [round(n, 2), round(us, 2)] for name, (n, us) in ranked}


def use_proposer(engine, config: SpeculativeConfig):
    """Switch the engine to a speculator with a proposer without a model (ngram, oracle), totals reset. A new
    Speculator, not a new proposer in the old one: its verify graphs are captured for its proposer (a device
    proposer's lookup runs inside them)."""
    from nanovllm.engine.spec import make_proposer
    from nanovllm.engine.spec.speculator import Speculator

    engine.config.speculative_config = config
    if engine.speculator is not None:
        engine.speculator.close()
    engine.speculator = Speculator(engine, make_proposer(config, engine))
    return engine.speculator


def measure(llm, prompts, max_tokens: int, method: str, workload: str, plain: dict, model: str, gpu: str,
            repeats: int) -> dict:
    """One row: the speculative run of `method` against the plain run `plain` (same engine)."""
    outputs, tok_s, accept = run_batch1(llm, prompts, max_tokens)
    k = llm.engine.speculator.k
    return dict(model=model, method=method, workload=workload, gpu=gpu, k=k, batch=1, num_prompts=len(prompts),
                max_tokens=max_tokens, plain_tok_s=plain["tok_s"], spec_tok_s=tok_s,
                speedup=tok_s / plain["tok_s"] if plain["tok_s"] else 0.0,
                identical=outputs == plain["outputs"], **accept,
                **verify_cost(llm, prompts[0], k, repeats))


def record_oracle(llm, oracle, prompts, plain_outputs, max_tokens: int, rounds: int = 8) -> int:
    """Give the oracle the target's greedy continuations as verify steps compute them. In bf16 a token scored in a
    verify row and one decoded alone can differ at near-ties, so the continuation depends on where the steps fall:
    speculative runs propose the previous run's output (the plain run's first) until a run gives back what it was
    proposed, each run agreeing with the one before at least up to its first rejection. Returns the runs taken."""
    proposed = plain_outputs
    for done in range(1, rounds + 1):
        for prompt, out in zip(prompts, proposed):
            oracle.remember(prompt, out)
        outputs = run_batch1(llm, prompts, max_tokens)[0]
        if outputs == proposed:
            return done
        proposed = outputs
    for prompt, out in zip(prompts, proposed):
        oracle.remember(prompt, out)
    log.warning("the oracle's continuation had not settled after %d speculative runs", rounds)
    return rounds


def plain_run(llm, prompts, max_tokens: int) -> dict:
    saved, llm.engine.speculator = llm.engine.speculator, None
    try:
        outputs, tok_s, _ = run_batch1(llm, prompts, max_tokens)
    finally:
        llm.engine.speculator = saved
    return dict(outputs=outputs, tok_s=tok_s)


def bench(cfg, methods, k: int, max_tokens: int, num_prompts: int | None, draft_model: str | None,
          repeats: int, report=print) -> list[dict]:
    """Rows for every method: ngram on the grounded prompts, oracle on the same prompts, draft_model (when
    named) on them too."""
    from nanovllm.bench import presets

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "draft_model" in methods and not draft_model:
        raise ValueError("method draft_model needs --draft-model NAME_OR_PATH (the target itself is allowed)")
    model = cfg.model.name
    texts = load_prompts(limit=num_prompts)
    rows = []
    base = SpeculativeConfig(method="ngram", num_speculative_tokens=k, max_batch_size=1)
    set_speculative(cfg, base)
    llm = presets.build_llm(cfg)
    try:
        gpu = llm.device_name
        prompts = encode(llm, texts, cfg.model.chat_template)
        plain = plain_run(llm, prompts, max_tokens)
        report(f"plain: {plain['tok_s']:.1f} tok/s")
        for method in [m for m in methods if m != "draft_model"]:
            spec = use_proposer(llm.engine, replace(base, method=method))
            oracle_runs = (record_oracle(llm, spec.proposer, prompts, plain["outputs"], max_tokens)
                           if method == "oracle" else None)
            workload = "oracle" if method == "oracle" else "grounded"
            rows.append(measure(llm, prompts, max_tokens, method, workload, plain, model, gpu, repeats))
            if oracle_runs:
                rows[-1]["oracle_runs"] = oracle_runs
            report(describe(rows[-1]))
    finally:
        presets.release(llm)
    if "draft_model" in methods:
        set_speculative(cfg, replace(base, method="draft_model", model=draft_model))
        llm = presets.build_llm(cfg)
        try:
            prompts = encode(llm, texts, cfg.model.chat_template)
            plain = plain_run(llm, prompts, max_tokens)
            rows.append(measure(llm, prompts, max_tokens, "draft_model", "grounded", plain, model, gpu, repeats))
            rows[-1]["draft_model"] = draft_model
            report(describe(rows[-1]))
        finally:
            presets.release(llm)
    return rows


def set_speculative(cfg, config: SpeculativeConfig) -> None:
    for key, value in vars(config).items():
        cfg.engine.speculative_config[key] = value


def describe(row: dict) -> str:
    return (f"{row['method']:<11} {row['workload']:<8} k={row['k']} plain {row['plain_tok_s']:8.1f} tok/s  "
            f"spec {row['spec_tok_s']:8.1f} tok/s  speedup {row['speedup']:.2f}x  "
            f"accepted length {row['mean_accepted_length']:.2f}  tokens/step {row['tokens_per_step']:.2f}  "
            f"verify cost {row['verify_cost']:.2f}x  "
            + (f"(GPU {row['verify_gpu_ms']:.3f} / {row['decode_gpu_ms']:.3f} ms)  " if row.get("verify_gpu_ms")
               else "") + f"identical {row['identical']}")
