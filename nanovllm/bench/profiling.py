"""Profile batch-1 decode steps with torch.profiler: kernel launches per step (CUDA kernel events per
step; on the CPU, top-level aten ops), time per op kind, the top kernels (also per call site: by the kernel
launched before), and a Chrome trace.

Tracing changes what it measures for kernels launched with PDL: it delays each kernel's start a little, which
paces the chain of launched-ahead kernels differently from an untraced replay. Time steps without the profiler
(`bench latency`); use the profile for where the time goes, not for how much there is.

Kernels replayed from a CUDA graph are reported by CUPTI as ordinary kernel events on recent torch, so
one count covers eager and graph steps. If a graph was launched but no kernel was seen, the count is
flagged as not covering graph kernels instead of reporting a silent zero.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType

# First match wins, so the specific kinds come before the catch-alls (a fused Triton norm kernel is
# named after its pieces, e.g. triton_red_fused_add_mean_mul_pow_rsqrt).
KINDS = (
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax|paged|batchdecode|batchprefill|merge_state|split_?kv"),
    ("gemm", r"gemm|gemv|matmul|cublas|cutlass|nvjet|xmma|aten::(addmm|mm|bmm|linear)\b|splitk"),
    ("norm", r"norm|rsqrt"),
    ("rope", r"rope|rotary"),
    ("sampling", r"argmax|argmin|sort|topk|sample|exponential|multinomial"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill|index|gather|scatter|cat|add|mul|silu|neg|"
                    r"where|triton_poi|aten::"),
)
_KIND_RES = tuple((k, re.compile(p, re.IGNORECASE)) for k, p in KINDS)
GRAPH_LAUNCH = ("cudaGraphLaunch", "cuGraphLaunch")
HOST_LAUNCH = re.compile(r"^(cuda|cu)(LaunchKernel|LaunchCooperativeKernel|GraphLaunch)")  # runtime/driver APIs
TOP = 15


def kind(name: str) -> str:
    return next((k for k, rx in _KIND_RES if rx.search(name)), "other")


def _duration_us(e) -> float:
    return e.time_range.end - e.time_range.start


def _is_top_level_aten(e) -> bool:
    if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
        return False
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def critical_us(events) -> dict[int, float]:
    """Per event (by id), the time it adds to the device's busy span: how far its end reaches past the end of
    every event that started before it, at most its own duration. Kernels launched with PDL overlap (the
    next one starts, prefetches and waits while the one before drains), so their durations double count;
    idle gaps between steps belong to no kernel."""
    out, reach = {}, float("-inf")
    for e in sorted(events, key=lambda e: e.time_range.start):
        out[id(e)] = min(_duration_us(e), max(0.0, e.time_range.end - reach))
        reach = max(reach, e.time_range.end)
    return out


def idle_us(events, critical: dict[int, float]) -> float:
    """The time inside the events' span that no event covers (their span less each one's critical part)."""
    if not events:
        return 0.0
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    return span - sum(critical[id(e)] for e in events)


def summarize(events, steps: int, on_cuda: bool) -> dict:
    if on_cuda:
        device_events = [e for e in events if e.device_type == DeviceType.CUDA]
        copies = [e for e in device_events if e.name.startswith(("Memcpy", "Memset"))]
        launched = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
        durations = {id(e): _duration_us(e) for e in device_events}
        critical = critical_us(device_events)
        unit = "CUDA kernels"
    else:
        device_events, copies = [], []
        launched = [e for e in events if _is_top_level_aten(e)]
        durations = {id(e): e.cpu_time_total for e in launched}
        critical = durations  # one op at a time
        unit = "top-level aten ops (CPU)"
    host = [e.name for e in events if e.device_type == DeviceType.CPU]
    graph_launches = sum(name in GRAPH_LAUNCH for name in host)
    host_launches = sum(bool(HOST_LAUNCH.match(name)) for name in host)
    by_kind = defaultdict(float)
    by_name, by_site = defaultdict(lambda: [0, 0.0, 0.0]), defaultdict(lambda: [0, 0.0, 0.0])  # calls, µs, critical
    lead = defaultdict(float)  # per call site: how long before the kernel before it ended it started
    before = None
    for e in sorted(launched, key=lambda e: e.time_range.start):
        by_kind[kind(e.name)] += durations[id(e)]
        # the kernel launched before it tells one kernel's call sites apart (a GEMV after the attention's merge
        # is the O projection, after the gate/up GEMV the down projection)
        site = (before.name if before else "", e.name)
        for key, table in ((e.name, by_name), (site, by_site)):
            table[key][0] += 1
            table[key][1] += durations[id(e)]
            table[key][2] += critical[id(e)]
        # with PDL, how early a kernel's programs got onto the GPU to prefetch (negative: a gap before it)
        lead[site] += before.time_range.end - e.time_range.start if before else 0.0
        before = e
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    sites = sorted(by_site.items(), key=lambda kv: -kv[1][2])[:TOP]
    out = dict(
        unit=unit, steps=steps, launches_per_step=len(launched) / steps,
        copies_per_step=len(copies) / steps, graph_launches_per_step=graph_launches / steps,
        # what the host paid: one call per eager kernel, one per graph replay
        host_launches_per_step=host_launches / steps,
        busy_us_per_step=sum(durations[id(e)] for e in launched) / steps,
        critical_us_per_step=sum(critical[id(e)] for e in launched) / steps,
        # the rest of the device's span: its copies (those on the compute stream's path) and idle gaps (graph
        # launches, the first kernel of a graph, which no PDL overlaps, a host that falls behind)
        copy_us_per_step=sum(critical[id(e)] for e in copies) / steps,
        idle_us_per_step=idle_us(device_events, critical) / steps,
        us_per_step_by_kind={k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        top=[dict(name=n, kind=kind(n), calls_per_step=c / steps, us_per_step=t / steps, mean_us=t / c,
                  critical_us_per_step=crit / steps) for n, (c, t, crit) in top],
        top_by_site=[dict(name=n, after=a, calls_per_step=c / steps, us_per_step=t / steps,
                          critical_us_per_step=crit / steps, mean_lead_us=lead[(a, n)] / c)
                     for (a, n), (c, t, crit) in sites],
    )
    out["graph_kernels_visible"] = not (on_cuda and graph_launches and not launched)
    if not out["graph_kernels_visible"]:
        out["note"] = ("CUDA graphs were launched but the profiler reported no kernels: launches_per_step does not "
                       "count kernels inside graphs on this torch/CUPTI")
    return out


def profile_steps(step: Callable[[], None], steps: int, device, trace_path: Path | None = None) -> dict:
    """Profile `steps` calls of `step` (warm it up first); writes a Chrome trace if `trace_path` is given."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    summary = summarize(prof.events(), steps, on_cuda)
    if trace_path is not None:
        summary["trace"] = str(write_trace(prof, Path(trace_path)))
    return summary


def write_trace(prof, path: Path) -> Path:
    """A Chrome trace; gzipped when the name ends in .gz (Perfetto and chrome://tracing open both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return path
    plain = path.with_suffix("")
    prof.export_chrome_trace(str(plain))
    with plain.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    return path


@contextlib.contextmanager
def _without_graphs(llm):
    """Decode steps run eagerly inside (ModelRunner.graphs set aside), for a reference count."""
    runner = llm.engine.runner
    graphs = getattr(runner, "graphs", None)
    runner.graphs = None
    try:
        yield
    finally:
        runner.graphs = graphs


def profile_llm(llm, steps: int = 8, warmup: int = 4, context: int = 128, trace_path: Path | None = None,
                batch: int = 1, temperature: float = 0.0) -> dict:
    """Decode steps of `batch` requests (batch 1 by default), after `warmup` unprofiled steps. When the engine
    replays CUDA graphs, a few steps are also profiled eagerly: if the graph steps show far fewer kernels than
    the eager ones, the profiler is missing kernels inside graphs and the count is flagged."""
    from nanovllm.bench.steps import DecodeSteps

    graphs = getattr(llm.engine.runner, "graphs", None) is not None
    eager_steps = min(steps, 4) if graphs else 0
    with DecodeSteps(llm, context, max_steps=warmup + steps + 2 * eager_steps, batch=batch,
                     temperature=temperature) as decode:
        for _ in range(warmup):
            decode.step()
        summary = profile_steps(decode.step, steps, llm.config.device, trace_path)
        if eager_steps:
            with _without_graphs(llm):
                for _ in range(eager_steps):  # warm up the eager path (allocator, lazy inits)
                    decode.step()
                eager = profile_steps(decode.step, eager_steps, llm.config.device)
            summary["eager"] = {k: eager[k] for k in ("launches_per_step", "host_launches_per_step",
                                                      "busy_us_per_step", "us_per_step_by_kind")}
            if summary["launches_per_step"] < 0.5 * eager["launches_per_step"]:
                summary["graph_kernels_visible"] = False
                summary["note"] = (f"graph steps show {summary['launches_per_step']:.0f} kernels, eager steps "
                                   f"{eager['launches_per_step']:.0f}: the profiler misses kernels inside CUDA graphs; "
                                   "use eager.launches_per_step")
    return dict(summary, context=context, batch=batch, temperature=temperature, warmup=warmup, cuda_graphs=graphs)
