"""`all`: every part in one process, one engine per preset, under a time budget.

Order: per preset (latency, profile, throughput for one preset), then peers, then the op
microbenchmarks, then the roofline. A part that fails records its error and the run goes on; a part
that would start after the budget is spent is skipped with a note. The results file is rewritten after
each part.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from nanovllm.bench import latency, op_bench, op_cases, peers, presets, profiling, results, roof, throughput, timing

PARTS = ("latency", "profile", "throughput", "peers", "ops", "roofline")
ENGINE_PARTS = ("latency", "profile", "throughput")


@dataclass
class Options:
    presets: tuple[str, ...] = ("auto",)
    overrides: tuple[str, ...] = ()          # Hydra overrides for every preset (model=..., device=..., ...)
    parts: tuple[str, ...] = PARTS
    out_dir: Path = results.DEFAULT_OUT_DIR
    budget_s: float | None = None
    contexts: tuple[int, ...] = latency.CONTEXTS
    new_tokens: int = latency.NEW_TOKENS
    throughput_preset: str | None = None     # None: the first preset
    num_requests: int = throughput.NUM_REQUESTS
    min_len: int = throughput.MIN_LEN
    max_len: int = throughput.MAX_LEN
    temperature: float = throughput.TEMPERATURE
    detokenize: bool = True                  # throughput: False for token ids only (nano-vllm's bench.py)
    profile_steps: int = 8
    profile_warmup: int = 4
    profile_context: int = 128
    traces: bool = True
    op_batches: tuple[int, ...] = op_bench.BATCHES
    op_contexts: tuple[int, ...] = op_cases.ATTN_CONTEXTS
    op_skip_backends: tuple[str, ...] = ()
    op_launches: int = timing.LAUNCHES
    op_repeats: int = timing.REPEATS
    peer_context: int = 128
    peer_eager_tokens: int = 32
    peer_compiled_tokens: int = 128
    peer_backend: str = "inductor"
    quick: bool = False
    extra: dict = field(default_factory=dict)


# --quick: a CPU smoke run of every part on the tiny model, in seconds. Greedy throughput there: sampling
# sorts the whole vocabulary per row, slow on a small CPU.
QUICK = dict(contexts=(16, 32), new_tokens=6, num_requests=3, min_len=4, max_len=8, temperature=0.0,
             profile_steps=2, profile_warmup=1, profile_context=16, op_batches=(1,), op_contexts=(16,),
             op_skip_backends=("compile",), op_launches=2, op_repeats=1, peer_context=16, peer_eager_tokens=3,
             peer_compiled_tokens=3, peer_backend="eager")
QUICK_OVERRIDES = ("model=tiny", "device=cpu", "engine=cpu_small")


class Budget:
    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()


class Suite:
    def __init__(self, opts: Options, console: Console | None = None):
        from nanovllm.config import EngineConfig

        self.o = opts
        self.console = console or Console(soft_wrap=True)
        self.budget = Budget(opts.budget_s)
        self.overrides = presets.merge_overrides(QUICK_OVERRIDES if opts.quick else (), opts.overrides)
        self.cfg = presets.compose_config("auto", self.overrides)  # model, device, dtype of every preset
        engine = EngineConfig(model=self.cfg.model.name, device=self.cfg.device, dtype=self.cfg.dtype)
        self.device, self.torch_dtype = engine.device, engine.torch_dtype
        self.model_path: str | None = None
        self.bw, self.bw_source = roof.bandwidth(self.device)
        options = dict(asdict(opts), overrides=self.overrides, out_dir=str(opts.out_dir))
        self.r = results.new(roof.device_name(self.device), options)
        self.r.update(device=self.device, dtype=str(self.torch_dtype).removeprefix("torch."), bandwidth=self.bw,
                      bandwidth_source=self.bw_source)
        self.path = Path(opts.out_dir) / results.file_name(self.r["gpu"], self.r["git_sha"], self.r["date"])

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.console.print(f"[dim][{self.budget.elapsed():7.1f} s][/dim] {msg}", highlight=False)

    def save(self) -> None:
        results.save(self.r, self.path)

    def _attempt(self, name: str, fn) -> bool:
        """Run one part; a failure is recorded under errors[name] and does not stop the run."""
        if self.budget.left() <= 0:
            self.r["notes"].append(f"{name}: skipped, time budget of {self.o.budget_s:.0f} s spent")
            self.log(f"[yellow]skip {escape(name)}: time budget spent[/]")
            return False
        self.log(f"{escape(name)} ...")
        try:
            fn()
            return True
        except Exception as e:
            self.r["errors"][name] = f"{type(e).__name__}: {e}"
            self.log(f"[red]{escape(name)} failed: {escape(str(e)[:300])}[/]")
            self.console.print(escape(traceback.format_exc(limit=6)), style="dim", highlight=False)
            return False
        finally:
            self.save()

    def _want(self, part: str) -> bool:
        return part in self.o.parts

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.log(f"bench on {escape(self.r['gpu'])} ({self.device}, {self.r['dtype']}); "
                 f"results: {escape(str(self.path))}")
        for i, preset in enumerate(self.o.presets):
            if any(map(self._want, ENGINE_PARTS)) or (i == 0 and self._want("roofline")):
                self._preset(preset)
        if self._want("peers"):
            self._attempt("peers", self._peers)
        if self._want("ops"):
            self._attempt("ops", self._ops)
        self._roofline()
        self.r["wall_s"] = self.budget.elapsed()
        self.save()
        return self.r

    def _preset(self, preset: str) -> None:
        state = {}

        def build():
            cfg = presets.compose_config(preset, self.overrides)
            need = max(self.o.contexts) + self.o.new_tokens + 16
            if self._want("throughput") and preset == self._throughput_preset():
                need = max(need, 2 * self.o.max_len + 16)
            t0 = time.perf_counter()
            state["llm"] = llm = presets.build_llm(cfg, min_model_len=need)
            self.r["presets"][preset] = dict(kernel_table=llm.kernel_table, build_s=time.perf_counter() - t0,
                                             engine_timings=dict(getattr(llm.engine.runner, "timings", {})),
                                             quantization=llm.quantization,
                                             weight_bytes=llm.model_info["weight_bytes"])
            if not self.r["model"]:
                self.r["model"] = llm.model_info
                self.model_path = self.r["model"]["path"]

        try:
            if not self._attempt(f"{preset}: build", build):
                return
            llm = state["llm"]
            if self._want("latency"):
                self._attempt(f"{preset}: latency", lambda: self._latency(preset, llm))
            if self._want("profile"):
                self._attempt(f"{preset}: profile", lambda: self._profile(preset, llm))
            if self._want("throughput") and preset == self._throughput_preset():
                self._attempt(f"{preset}: throughput", lambda: self._throughput(preset, llm))
        finally:
            presets.release(state.pop("llm", None))

    def _throughput_preset(self) -> str:
        return self.o.throughput_preset or self.o.presets[0]

    # -- parts ---------------------------------------------------------------------------------------------
    def _latency(self, preset: str, llm) -> None:
        info = llm.model_info  # this preset's weight bytes: a quantized preset reads fewer
        for entry in latency.measure(llm, self.o.contexts, self.o.new_tokens):
            ctx = entry["mean_context"]
            entry.update(preset=preset, model=info["name"], quantization=llm.quantization,
                         roofline_tok_s=roof.tok_s(info, self.bw, ctx),
                         pct_roofline=roof.pct(entry["decode_tok_s"], info, self.bw, ctx))
            self.r["latency"].append(entry)
            self.log(f"  {preset} ctx {entry['context']}: {entry['decode_tok_s']:.1f} tok/s "
                     f"(median {entry['median_ms']:.3f} ms, p90 {entry['p90_ms']:.3f} ms, "
                     f"{entry['pct_roofline']:.1f}% of roofline)")

    def _profile(self, preset: str, llm) -> None:
        trace = Path(self.o.out_dir) / f"trace_{results.slug(preset)}.json.gz" if self.o.traces else None
        summary = profiling.profile_llm(llm, self.o.profile_steps, self.o.profile_warmup, self.o.profile_context,
                                        trace_path=trace)
        summary.update(preset=preset, gpu=self.r["gpu"])
        self.r["profile"][preset] = summary
        # graph kernels hidden from the profiler: the eager steps' count is the honest one
        counted = summary if summary["graph_kernels_visible"] or "eager" not in summary else summary["eager"]
        self.r["launches_per_token"][preset] = counted["launches_per_step"]
        self.log(f"  {preset}: {summary['launches_per_step']:.1f} {summary['unit']} per decode step")

    def _throughput(self, preset: str, llm) -> None:
        left = self.budget.left()
        t = throughput.measure(llm, self.o.num_requests, self.o.min_len, self.o.max_len, self.o.temperature,
                               deadline_s=None if math.isinf(left) else max(left, 1.0), detokenize=self.o.detokenize)
        if not t["complete"]:
            self.r["notes"].append(f"throughput stopped at the time budget after {t['generated_tokens']} of "
                                   f"{t['expected_tokens']} tokens: not comparable with a complete run")
        self.r["throughput"] = dict(t, preset=preset, quantization=llm.quantization)
        self.log(f"  {preset}: {t['output_tok_s']:.0f} output tok/s ({t['generated_tokens']} tokens, "
                 f"{t['wall_s']:.1f} s, text {'on' if t['detokenize'] else 'off'}, {t['preemptions']} preemptions, "
                 f"KV cache {t['kv_cache_tokens']} tokens)")

    def _model_path(self) -> str:
        if self.model_path is None:
            from nanovllm.checkpoints import resolve_model

            self.model_path = str(resolve_model(self.cfg.model.name, revision=self.cfg.model.revision))
        return self.model_path

    def _peers(self) -> None:
        o = self.o
        rates, details = peers.run(self._model_path(), self.device, self.torch_dtype, o.peer_context,
                                   o.peer_eager_tokens, o.peer_compiled_tokens, o.peer_backend, self.budget.left)
        for name, d in details.items():
            if rates.get(name) and self.r["model"]:
                ctx = o.peer_context + d.get("new_tokens", 0) // 2
                d["pct_roofline"] = roof.pct(rates[name], self.r["model"], self.bw, ctx)
            self.log(f"  {name}: " + (f"{rates[name]:.1f} tok/s" if rates.get(name) else f"failed: {d.get('error')}"))
        self.r["peers"], self.r["peer_details"] = rates, details

    def _ops(self) -> None:
        from nanovllm.models.loader import load_hf_config

        o = self.o
        shapes = op_cases.ModelShapes.from_hf(load_hf_config(Path(self._model_path())),
                                              self.cfg.engine.kvcache_block_size)
        out = op_bench.run(shapes, self.device, self.torch_dtype, o.op_batches, o.op_skip_backends,
                           time_left=self.budget.left, contexts=o.op_contexts, launches=o.op_launches,
                           repeats=o.op_repeats, plugin_dirs=self.cfg.kernels.plugin_dirs or ())
        self.r["ops"], self.r["ops_skipped"] = out.pop("ops"), out.pop("skipped")
        self.r["ops_info"] = out
        self.log(f"  {len(self.r['ops'])} op timings, {len(self.r['ops_skipped'])} skipped")

    def _roofline(self) -> None:
        if not self.r["model"]:
            return
        ctx = self.o.contexts[0] + self.o.new_tokens // 2  # the mean context of the first latency run
        self.r["roofline"] = roof.table(self.r["model"], self.bw, self.bw_source, sorted({0, ctx, *self.o.contexts}))
        self.r["roofline_context"] = ctx
        self.r["roofline_tok_s"] = roof.tok_s(self.r["model"], self.bw, ctx)
