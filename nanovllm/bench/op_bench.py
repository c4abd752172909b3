"""Per-op microbenchmarks: every registered implementation of every op that supports the device, at
the model's shapes, for each batch size. Achieved GB/s counts the bytes the op must move at the least
(op_cases), and is also given as % of the device's bandwidth (nanovllm.roofline)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanovllm.bench import op_cases, roof
from nanovllm.bench.timing import LAUNCHES, REPEATS, rotating, time_call
from nanovllm.ops import COMPILE, OPS, PlanContext, Target, load_plugins, native_site, resolve

log = logging.getLogger("nanovllm.bench")
BATCHES = (1, 64)


def _callable(op: str, backend: str, target: Target) -> Callable:
    """The backend's callable; a fusion site gets native parts, so only the site's own backend is timed."""
    parts = {p: native_site(p) for p in OPS[op].parts}
    fn, used = resolve(op, backend, target, allow_fallback=False, parts=parts)
    assert used == backend
    return fn


@dataclass
class OpBench:
    shapes: op_cases.ModelShapes
    device: torch.device
    dtype: torch.dtype
    batches: tuple[int, ...] = BATCHES
    contexts: tuple[int, ...] = op_cases.ATTN_CONTEXTS
    launches: int = LAUNCHES
    repeats: int = REPEATS
    time_left: Callable[[], float] | None = None
    entries: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.bw, self.bw_source = roof.bandwidth(self.device)
        s = self.shapes
        self.target = Target(self.device.type, self.dtype, s.target_shapes())
        self.plan_ctx = PlanContext(num_qo_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
                                    page_size=s.block_size, dtype=self.dtype, device=self.device,
                                    max_num_seqs=max(self.batches),
                                    max_model_len=max(*self.contexts, op_cases.PREFILL_LEN) + 1)

    def callables(self, ops=None, skip_backends=()) -> dict[tuple[str, str], Callable]:
        """(op, backend) -> callable for every implementation that can run here; the rest go to skipped."""
        fns = {}
        for op in sorted(OPS):
            if ops and op not in ops:
                continue
            for backend, impl in sorted(OPS[op].impls.items()):
                why = "skipped by request" if backend in skip_backends else \
                    impl.support.reason_unsupported(self.device.type, self.dtype, self.target.shapes)
                if why is None:
                    try:
                        fns[op, backend] = _callable(op, backend, self.target)
                    except Exception as e:  # one broken backend must not stop the others
                        why = f"{type(e).__name__}: {e}"
                if why is not None:
                    self.skipped.append(dict(op=op, backend=backend, reason=why))
        return fns

    def time_op(self, op: str, fns: dict) -> None:
        """Every batch and case of one op, each case's inputs shared by all of the op's backends."""
        backends = [b for (o, b) in fns if o == op]
        for batch in self.batches:
            if self.time_left is not None and self.time_left() <= 0:
                self.skipped += [dict(op=op, backend=b, batch=batch, reason="time budget spent") for b in backends]
                continue
            cases = op_cases.cases(op, self.shapes, batch, self.device, self.dtype, self.contexts)
            if cases is None:
                self.skipped += [dict(op=op, backend=b, reason="no benchmark case for this op") for b in backends]
                return
            for case in cases:
                arg_sets = rotating(case.args, case.bytes, self.device, self.launches)
                for backend in backends:
                    self.entries.append(self.time_one(op, backend, case, batch, fns[op, backend], arg_sets))
                del arg_sets
            del cases
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def time_one(self, op, backend, case, batch, fn, arg_sets) -> dict:
        entry = dict(op=op, backend=backend, case=case.name, batch=batch, bytes=case.bytes, copies=len(arg_sets),
                     **case.info)
        try:
            plan = OPS[op].impls[backend].plan
            if plan is not None and case.meta is not None:
                plan(case.meta, self.plan_ctx)  # once, outside the graph, as the engine does before a step
            seconds, method = time_call(fn, arg_sets, self.device, self.launches, self.repeats)
            entry.update(time_us=seconds * 1e6, gbps=case.bytes / seconds / 1e9,
                         pct_bandwidth=100.0 * case.bytes / seconds / self.bw, method=method)
        except Exception as e:  # recorded in the entry; the other entries still run
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("op %s/%s %s batch %d failed: %s", op, backend, case.name, batch, entry["error"])
        return entry


@torch.inference_mode()
def run(shapes: op_cases.ModelShapes, device, dtype, batches=BATCHES, skip_backends=(), ops=None,
        time_left: Callable[[], float] | None = None, plugin_dirs=(), contexts=op_cases.ATTN_CONTEXTS,
        launches: int = LAUNCHES, repeats: int = REPEATS) -> dict:
    """{"ops": [entry], "skipped": [{op, backend, reason}], "bandwidth": ...}. An entry that fails to run
    carries `error` instead of a time; `time_left()` <= 0 stops early (the rest is listed as skipped)."""
    load_plugins(plugin_dirs)
    bench = OpBench(shapes, device, dtype, tuple(batches), tuple(contexts), launches, repeats, time_left)
    fns = bench.callables(ops, skip_backends)
    # Every op's own backends first, the per-op torch.compile last: its compiles are slow and least telling.
    for late in (False, True):
        group = {k: f for k, f in fns.items() if (k[1] == COMPILE) == late}
        for op in sorted({o for o, _ in group}):
            bench.time_op(op, group)
    return dict(ops=bench.entries, skipped=bench.skipped, bandwidth=bench.bw, bandwidth_source=bench.bw_source,
                device=roof.device_name(bench.device), dtype=str(dtype).removeprefix("torch."), shapes=vars(shapes))
