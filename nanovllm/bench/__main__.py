"""python -m nanovllm.bench COMMAND [options] [hydra overrides]

  all         every part below in one process (one engine per preset), under --budget-s
  latency     batch-1 decode at contexts 128/1024/4096: median and p90 ms/token per preset
  throughput  nano-vllm's offline workload (256 random requests): output tok/s
  ops         per-op microbenchmarks of every registered implementation: GB/s and % of bandwidth
  peers       transformers eager and transformers + StaticCache + torch.compile on the same weights
  roofline    bytes per token over the device's bandwidth
  profile     kernel launches per decode step, time per op kind, top kernels, Chrome trace
  spec        speculative decoding at batch 1: tok/s with and without, mean accepted length, verify-step cost
              (n-gram and draft model on input-grounded text; the oracle proposer for the mechanism alone)
  paths       every execution path's teacher-forced logits against transformers (correctness, not speed)
  compare     compare RUN.json [--baseline B] [--threshold 0.05]: RUN against its GPU's baseline
              (benchmarks/baseline/<gpu>.json), or compare A.json B.json; exit 1 on a regression
  baseline    baseline RUN.json [--presets auto]: fold a run's rows into its GPU's baseline file
  plot        plot RUN.json --out x.png: tok/s per preset against targets, peers and roofline

Hydra overrides apply to every preset, as in `python -m nanovllm.run`: model=tiny device=cpu engine.enforce_eager=true.
Example (CPU smoke run): python -m nanovllm.bench all --quick --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

RUN_COMMANDS = ("all", "latency", "throughput", "ops", "peers", "roofline")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CPU smoke run: model=tiny device=cpu, tiny sizes")
    p.add_argument("--out-dir", type=Path, default=None, help="where results, traces and plots go "
                   "(default ./bench-results)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every preset (model=..., device=..., ...)")


def _run_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help=f"run the {name} part" if name != "all" else "run every part")
    _common(p)
    p.add_argument("--presets", type=_names, default=None, help="comma list of configs/kernels presets; "
                   "a+b stacks two (default: auto)")
    p.add_argument("--budget-s", type=float, default=None, help="skip parts that would start after this many s")
    if name == "all":
        p.add_argument("--skip", type=_names, default=(), help="parts to leave out, e.g. peers,ops")
    p.add_argument("--contexts", type=_ints, default=None, help="latency contexts (default 128,1024,4096)")
    p.add_argument("--new-tokens", type=int, default=None, help="latency: new tokens per context (default 256)")
    p.add_argument("--throughput-preset", default=None, help="preset for the throughput run (default: the first)")
    p.add_argument("--num-requests", type=int, default=None, help="throughput requests (default 256)")
    p.add_argument("--no-detokenize", dest="detokenize", action="store_false", default=None,
                   help="throughput: token ids only, no text (as nano-vllm's bench.py)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled decode steps per preset (default 8)")
    p.add_argument("--no-traces", dest="traces", action="store_false", default=None, help="no Chrome traces")
    p.add_argument("--op-batches", type=_ints, default=None, help="ops: batch sizes (default 1,64)")
    p.add_argument("--op-skip-backends", type=_names, default=None, help="ops: backends not to time")
    p.add_argument("--peer-backend", default=None, help="torch.compile backend of the compiled peer (inductor)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG next to the results")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanovllm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in RUN_COMMANDS:
        _run_parser(sub, name)
    p = sub.add_parser("profile", help="profile batch-1 decode steps of one preset")
    _common(p)
    p.add_argument("--preset", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--context", type=int, default=None, help="prompt tokens before the profiled steps (128)")
    p.add_argument("--batch", type=int, default=1, help="requests decoding together (the throughput regime: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the requests (0: greedy; "
                   "the throughput workload samples at 0.6)")
    p = sub.add_parser("spec", help="speculative decoding: speed-up, accepted length, verify-step cost")
    _common(p)
    p.add_argument("--preset", default="auto")
    p.add_argument("--methods", type=_names, default=("ngram", "oracle"), help="ngram, oracle, draft_model "
                   "(default ngram,oracle)")
    p.add_argument("--draft-model", default=None, help="draft_model: a smaller model with the target's tokenizer")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens (default 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per prompt (default 128; --quick 16)")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts of the workload (default all; --quick 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of the verify-cost steps")
    p = sub.add_parser("paths", help="every execution path's logits against transformers (correctness)")
    _common(p)
    p.add_argument("--paths", type=_names, default=None, help="paths to check (default: all of nanovllm.bench.paths)")
    p.add_argument("--dtypes", type=_names, default=None, help="float32, bfloat16 (default: both)")
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions after a 50-token prompt")
    p.add_argument("--text", type=Path, default=None, help="text file to teach (default: a built-in paragraph)")
    p = sub.add_parser("compare", help="a run against its GPU's baseline (or A B: B over A); exit 1 on a regression")
    p.add_argument("files", type=Path, nargs="+", metavar="RUN.json", help="RUN.json, or A.json B.json")
    p.add_argument("--baseline", type=Path, default=None, help="baseline file (default: benchmarks/baseline/"
                   "<gpu>.json for the run's GPU)")
    p.add_argument("--threshold", type=float, default=0.05, help="tolerated relative loss (default 0.05)")
    p = sub.add_parser("baseline", help="fold a run's rows into its GPU's baseline file")
    p.add_argument("run", type=Path)
    p.add_argument("--presets", type=_names, default=None, help="take only these presets' rows (default: all)")
    p.add_argument("--out", type=Path, default=None, help="baseline file (default: benchmarks/baseline/<gpu>.json)")
    p = sub.add_parser("plot", help="bar chart of tok/s per preset")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: next to RUN)")
    p.add_argument("--context", type=int, default=128)
    return parser


def _options(args):
    from nanovllm.bench.suite import PARTS, QUICK, Options

    given = {k: getattr(args, k) for k in ("presets", "budget_s", "contexts", "new_tokens", "throughput_preset",
                                           "num_requests", "profile_steps", "traces", "op_batches",
                                           "op_skip_backends", "peer_backend", "out_dir", "detokenize")}
    kwargs = {**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    unknown = set(getattr(args, "skip", ())) - set(PARTS)
    if unknown:
        raise SystemExit(f"--skip: unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    parts = tuple(p for p in PARTS if p not in args.skip) if args.command == "all" else (args.command,)
    return Options(**kwargs, parts=parts, overrides=tuple(args.overrides), quick=args.quick)


def run_command(args, console: Console) -> int:
    from nanovllm.bench.plot import plot
    from nanovllm.bench.report import print_summary
    from nanovllm.bench.suite import Suite

    suite = Suite(_options(args), console)
    r = suite.run()
    print_summary(r, console)
    if args.plot and r["latency"]:
        try:
            console.print(f"plot: {plot(r, suite.path.with_suffix('.png'))}")
        except Exception as e:  # a plot is a convenience; the results file is what matters
            console.print(f"[yellow]plot failed: {e}[/]")
    console.print(f"results: {suite.path}")
    return 0


def profile_command(args, console: Console) -> int:
    from nanovllm.bench import presets, results
    from nanovllm.bench.profiling import profile_llm
    from nanovllm.bench.report import print_profile
    from nanovllm.bench.suite import QUICK, QUICK_OVERRIDES

    overrides = presets.merge_overrides(QUICK_OVERRIDES if args.quick else (), args.overrides)
    context = args.context or (QUICK["profile_context"] if args.quick else 128)
    out_dir = args.out_dir or results.DEFAULT_OUT_DIR
    cfg = presets.compose_config(args.preset, overrides)
    llm = presets.build_llm(cfg, min_model_len=context + args.warmup + 3 * args.steps + 16)  # + eager steps
    try:
        name = results.slug(args.preset) + (f"_batch{args.batch}" if args.batch > 1 else "")
        trace = Path(out_dir) / f"trace_{name}.json.gz"
        summary = profile_llm(llm, args.steps, args.warmup, context, trace, args.batch, args.temperature)
        summary.update(preset=args.preset, gpu=llm.device_name, kernel_table=llm.kernel_table)
    finally:
        presets.release(llm)
    print_profile(summary, console)
    path = results.save(summary, Path(out_dir) / f"profile_{name}.json")
    console.print(f"trace: {trace}\nsummary: {path}")
    return 0


def spec_command(args, console: Console) -> int:
    from nanovllm.bench import presets, results, spec
    from nanovllm.bench.suite import QUICK_OVERRIDES

    overrides = presets.merge_overrides(QUICK_OVERRIDES if args.quick else (), args.overrides)
    cfg = presets.compose_config(args.preset, overrides)
    max_tokens = args.max_tokens or (16 if args.quick else 128)
    num_prompts = args.num_prompts or (3 if args.quick else None)
    try:
        rows = spec.bench(cfg, args.methods, args.k, max_tokens, num_prompts, args.draft_model, args.repeats,
                          report=lambda line: console.print(line, highlight=False, markup=False))
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        return 2
    gpu = rows[0]["gpu"] if rows else "unknown"
    r = results.new(gpu, dict(overrides=list(overrides), preset=args.preset, methods=list(args.methods),
                              k=args.k, max_tokens=max_tokens, num_prompts=num_prompts,
                              draft_model=args.draft_model))
    r["speculative"] = rows
    out = results.save(r, Path(args.out_dir or results.DEFAULT_OUT_DIR) / f"spec_{results.slug(gpu)}.json")
    console.print(f"results: {out}")
    return 0


def paths_command(args, console: Console) -> int:
    from nanovllm.bench import paths, presets, results
    from nanovllm.bench.suite import QUICK_OVERRIDES

    try:
        chosen = paths.select(args.paths, args.dtypes)
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        return 2
    overrides = tuple(presets.merge_overrides(QUICK_OVERRIDES if args.quick else (), args.overrides))
    text = args.text.read_text() if args.text else paths.TEXT
    rows = paths.check(overrides, args.positions, chosen, text, report=lambda r: console.print(
        paths.describe(r), highlight=False, markup=False))
    gpu = device_name(overrides)
    r = results.new(gpu, dict(overrides=list(overrides), positions=args.positions, dtypes=chosen))
    r["paths"] = rows
    out = results.save(r, paths.out_path(args.out_dir or results.DEFAULT_OUT_DIR, gpu))
    failed = [f"{x['dtype']} {x['path']}" for x in rows if "error" in x]
    console.print(f"results: {out}" + (f"\n[red]failed: {', '.join(failed)}[/]" if failed else ""))
    return 1 if failed else 0


def device_name(overrides) -> str:
    """The name of the device the overrides resolve to (device=auto: the GPU when there is one)."""
    from nanovllm.bench import presets, roof
    from nanovllm.config import EngineConfig

    cfg = presets.compose_config("baseline", overrides)
    return roof.device_name(EngineConfig(model=cfg.model.name, device=cfg.device, dtype=cfg.dtype).device)


def compare_command(args, console: Console) -> int:
    from nanovllm.bench import compare

    if len(args.files) > 2 or (len(args.files) == 2 and args.baseline):
        console.print("[red]compare takes RUN.json [--baseline B], or A.json B.json[/]")
        return 2
    if len(args.files) == 2:
        return compare.main(str(args.files[0]), str(args.files[1]), args.threshold, console)
    return compare.gate(str(args.files[0]), args.baseline and str(args.baseline), args.threshold, console)


def baseline_command(args, console: Console) -> int:
    from nanovllm.bench import baseline, results

    run = results.load(args.run)
    if not run.get("gpu"):
        console.print(f"[red]{args.run} names no GPU: not a results file of `python -m nanovllm.bench`[/]")
        return 2
    try:
        out = args.out or baseline.find(run["gpu"])
    except FileNotFoundError:  # the first baseline of this GPU
        out = baseline.default_path(run["gpu"])
    before = results.load(out) if Path(out).is_file() else None
    merged = baseline.merge(before, run, args.presets)
    console.print(f"baseline: {results.save(merged, out)} ({len(merged['latency'])} latency rows)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # logs of a GPU run are read later: tables there get a wide page rather than a cut one
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 180)
    try:
        return dispatch(args, console)
    except ValueError as e:
        from nanovllm.bench.presets import BadOverrides

        if not isinstance(e, BadOverrides):
            raise
        console.print(str(e), style="red", markup=False, highlight=False)  # Hydra's message, not its traceback
        return 2


def dispatch(args, console: Console) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "compare":
        return compare_command(args, console)
    if args.command == "paths":
        return paths_command(args, console)
    if args.command == "spec":
        return spec_command(args, console)
    if args.command == "baseline":
        return baseline_command(args, console)
    if args.command == "plot":
        from nanovllm.bench.plot import plot
        from nanovllm.bench.results import load

        try:
            console.print(f"plot: {plot(load(args.run), args.out or args.run.with_suffix('.png'), args.context)}")
        except ValueError as e:
            console.print(f"[red]{e}[/]")
            return 2
        return 0
    if args.command == "profile":
        return profile_command(args, console)
    return run_command(args, console)


if __name__ == "__main__":
    sys.exit(main())
