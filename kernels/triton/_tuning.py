"""Launch configs for the GEMV-shaped kernels: a JSON cache per GPU, filled by timing candidates in a CUDA graph.

Why not `triton.autotune`: its benchmark cannot run inside CUDA-graph capture or a torch.compile trace,
it re-tunes in every process, and it times a single weight copy that sits in L2. Here a config is looked
up by (op, dtype, N, K, M-bucket) in ~/.cache/nanovllm/triton/<gpu>.json (then in the shipped
kernels/triton/tuned/<gpu>.json); a miss on real tensors outside capture tunes once, timing each candidate
back-to-back in a CUDA graph over rotating weight copies, and records the winner.
A miss that cannot tune (capture, tracing, NANOVLLM_TRITON_TUNE=0) uses a shape heuristic.
Shipped entries with a "chosen" note were picked end to end instead: timed alone, a GEMV prefers many
one-warp programs, but in the decode chain fewer, larger programs (fewer registers and program slots per
weight byte) leave room for the kernels PDL launches ahead to prefetch theirs (benchmarks/RESULTS.md).
An optional "note" states how an entry was chosen; only the config fields are read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import triton

from nanovllm.ops.workspace import unpooled
from nanovllm.utils.cuda_graph import capture

log = logging.getLogger("nanovllm.triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_M = 16  # rows served by the GEMV kernels; more rows (prefill) go to cuBLAS / the native site
SHIPPED = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class Config:
    """A GEMV launch. SERIAL (with SPLIT_K > 1): the tile's last program sums the partials in the same launch
    (_gemv_core.reduce_if_last) instead of a sum kernel after it; the tuner times both."""
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 1
    SERIAL: bool = False

    @classmethod
    def of(cls, entry: dict) -> Config:
        """The config of a table entry (an entry written before a field existed takes its default)."""
        return cls(**{f: entry[f] for f in cls.__dataclass_fields__ if f in entry})

    def with_serial_twins(self) -> list[Config]:
        """This config, and with a split K also its twin that reduces in the same launch."""
        return [self, replace(self, SERIAL=True)] if self.SPLIT_K > 1 else [self]

    def meta(self) -> dict:
        return dict(BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def block_m(m: int) -> int:
    """Rows per program: 1 runs the FMA path (batch 1), 16 the tl.dot path (tensor cores need 16 rows)."""
    return 1 if m == 1 else 16


def m_bucket(m: int) -> int:
    return next(b for b in (1, 4, 8, 16) if m <= b) if m <= 16 else m


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def candidates(n: int, k: int, m: int, sms: int, split: bool = True) -> list[Config]:
    """Configs worth timing.

    One row (FMA path): BLOCK_K is 256 or 512 columns per warp, so the warps split K and never hold the
    same x columns (a shared-memory shuffle of x per step otherwise), and each thread keeps 4 or 8
    16-byte weight loads in flight; where one tile spans K (nothing else is held then), also up to 2048
    columns per warp, one warp, and 16 or 32 loads per thread. Split-K is offered only while the N blocks alone
    leave SMs idle."""
    kmax = max(triton.next_power_of_2(k), 16)
    out: list[Config] = []
    if block_m(m) == 1:
        def fits(bn: int, bk: int, nw: int) -> bool:
            per_thread = bn * bk // (32 * nw)  # weight elements a thread holds
            if bk >= k:
                return per_thread in (32, 64, 128, 256)
            return nw > 1 and bk <= 512 * nw and bk <= max(kmax, 512) and per_thread in (32, 64)
        shapes = [(bn, bk, nw) for nw in (1, 2, 4, 8) for bk in (256 * nw, 512 * nw, 1024 * nw, 2048 * nw)
                  for bn in (1, 2, 4, 8, 16, 32) if bk < 2 * kmax and fits(bn, bk, nw)]
        stages, waves = 1, 2  # plain loads are not software-pipelined; more stages only cost shared memory
    else:  # tl.dot path: weight tiles go through shared memory by cp.async, pipelined
        shapes = [(bn, min(bk, kmax), 4) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 128))]
        stages, waves = 3, 1
    for bn, bk, nw in shapes:
        blocks = triton.cdiv(n, bn)
        for sk in (1, 2, 4) if split else (1,):
            if sk == 1 or (blocks < waves * sms and blocks * sk <= 8 * sms and k >= sk * bk):
                out += Config(bn, bk, sk, nw, stages).with_serial_twins()
    return list(dict.fromkeys(out))


def heuristic(n: int, k: int, m: int, sms: int, split: bool = True) -> Config:
    """A sane untuned config: enough programs for two waves, 8 KB weight tiles."""
    if INTERPRET:  # two big programs: the interpreter's cost is per program and per op, not per element
        return Config(max(16, min(4096, triton.next_power_of_2(triton.cdiv(n, 2)))), 64, 1, 4, 1)
    if block_m(m) == 1:  # 4 warps over 1024 columns, 8 weight loads in flight per thread
        return Config(8, 1024, 1, 4, 1)
    bn, bk = 32, min(128, max(triton.next_power_of_2(k), 16))
    sk = 1
    while split and triton.cdiv(n, bn) * sk < sms and k >= 2 * sk * bk and sk < 8:
        sk *= 2
    return Config(bn, bk, sk, 4, 3)


# -- the on-disk cache ---------------------------------------------------------------------------------
@functools.cache
def gpu_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cache_dir() -> Path:
    return Path(os.environ.get("NANOVLLM_TRITON_CACHE") or Path.home() / ".cache" / "nanovllm" / "triton").expanduser()


_tables: dict[str, dict] = {}


def _table(slug: str) -> dict:
    if slug not in _tables:
        table = {}
        for path in (SHIPPED / f"{slug}.json", cache_dir() / f"{slug}.json"):  # the user's cache wins
            with contextlib.suppress(OSError, ValueError):
                table.update(json.loads(path.read_text()))
        _tables[slug] = table
    return _tables[slug]


def _record(slug: str, key: str, cfg: Config, seconds: float) -> None:
    entry = {**asdict(cfg), "us": round(seconds * 1e6, 3), "triton": triton.__version__}
    _table(slug)[key] = entry
    path = cache_dir() / f"{slug}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = {}
        with contextlib.suppress(OSError, ValueError):
            on_disk = json.loads(path.read_text())
        on_disk[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as e:
        log.warning("could not write the Triton tuning cache %s: %s", path, e)


def cached(device: torch.device, key: str) -> dict | None:
    """The recorded entry for `key` ("op:dtype:N..:K..:M.."), if any (for reports)."""
    return _table(gpu_slug(device)).get(key)


_forced: list[Config] = []


@contextlib.contextmanager
def forced(cfg: Config):
    """Use `cfg` for every launch inside the block (tests and benchmarks)."""
    _forced.append(cfg)
    try:
        yield
    finally:
        _forced.pop()


def _can_tune(*tensors: torch.Tensor) -> bool:
    if os.environ.get("NANOVLLM_TRITON_TUNE", "1") == "0" or torch.compiler.is_compiling():
        return False
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # fake / functional tensors
        return False
    return not torch.cuda.is_current_stream_capturing()


_memo: dict[tuple, Config] = {}  # resolved (cached or tuned) configs: the launch path skips the lookups


def choose(op: str, n: int, k: int, m: int, x: torch.Tensor, w: torch.Tensor,
           make_bench: Callable[[], Callable[[Config], float]] | None, split: bool = True) -> Config:
    """The config for one launch. Only when tuning, `make_bench()` builds `bench(cfg)` -> seconds per launch."""
    if _forced:
        return _forced[-1]
    memo = (op, n, k, m_bucket(m), w.dtype, x.device)
    if memo in _memo:
        return _memo[memo]
    sms = num_sms(x.device)
    if x.device.type != "cuda":
        return heuristic(n, k, m, sms, split)
    slug = gpu_slug(x.device)
    key = f"{op}:{str(w.dtype).removeprefix('torch.')}:N{n}:K{k}:M{m_bucket(m)}"
    hit = _table(slug).get(key)
    if hit is not None:
        _memo[memo] = Config.of(hit)
        return _memo[memo]
    if make_bench is None or not _can_tune(x, w):  # not memoized: a later eager call may still tune
        return heuristic(n, k, m, sms, split)
    configs = [heuristic(n, k, m, sms, split), *candidates(n, k, m, sms, split)]
    best, best_t = tune(key, configs, make_bench())
    _record(slug, key, best, best_t)
    _memo[memo] = best
    return best


def tune(key: str, configs: Iterable[Config], bench: Callable[[Config], float]) -> tuple[Config, float]:
    budget = float(os.environ.get("NANOVLLM_TRITON_TUNE_BUDGET_S", "30"))
    t0, results = time.perf_counter(), {}
    for cfg in dict.fromkeys(configs):
        if results and time.perf_counter() - t0 > budget:
            log.warning("tuning %s: %.0f s budget spent after %d configs", key, budget, len(results))
            break
        try:
            with unpooled():  # the benches' scratch stays out of the engine's workspaces
                results[cfg] = bench(cfg)
        except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
            log.debug("tuning %s: %s failed: %s", key, cfg, e)
    if not results:
        raise RuntimeError(f"tuning {key}: no candidate config ran")
    best = min(results, key=results.get)
    log.info("tuned %s in %.1f s over %d configs: %s, %.2f us", key, time.perf_counter() - t0, len(results),
             best, results[best] * 1e6)
    return best, results[best]


# -- timing --------------------------------------------------------------------------------------------
def num_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of `nbytes` of weights overflow L2 four times (each launch then reads HBM)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(64, triton.cdiv(4 * l2, nbytes)))


def weight_copies(w: torch.Tensor) -> list[torch.Tensor]:
    """`w` and clones of it; a Parameter's clones are Parameters, so they take the same kernel variant."""
    wrap = (lambda t: torch.nn.Parameter(t, requires_grad=False)) if isinstance(w, torch.nn.Parameter) else None
    clones = [w.detach().clone() for _ in range(num_copies(w.numel() * w.element_size(), w.device) - 1)]
    return [w] + [wrap(c) if wrap else c for c in clones]


def graph_time(launch: Callable[[int], object], num_copies: int, launches: int = 50, reps: int = 5) -> float:
    """Seconds per launch of `launch(i)` (i = the weight copy to read), back-to-back in one CUDA graph."""
    launch(0)  # compile outside the capture

    def launch_all():
        for i in range(launches):
            launch(i % num_copies)

    graph, _ = capture(launch_all, warmup=lambda: launch(1 % num_copies))
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    del graph
    return sorted(times)[len(times) // 2]
