"""compare: the ratio B/A of every entry two results files share, and exit status 1 when a gated entry got worse
by more than the threshold. Peers are shown but not gated (they are not ours); launches per token are gated the
other way round (fewer is better); entries found in only one file are listed, not gated.

  compare RUN.json                  RUN against the baseline of RUN's GPU (nanovllm.bench.baseline)
  compare RUN.json --baseline B     RUN against the baseline file B
  compare A.json B.json             two runs: B over A
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def entries(r: dict) -> dict[str, tuple[float, bool, bool]]:
    """name -> (value, higher is better, gated)."""
    out = {}
    for e in r.get("latency", []):
        out[f"latency {e['preset']} ctx{e['context']} tok/s"] = (e["decode_tok_s"], True, True)
    th = r.get("throughput") or {}
    if th.get("output_tok_s"):  # a run cut short by the time budget is shown, not gated
        out["throughput output tok/s"] = (th["output_tok_s"], True, th.get("complete", True))
    for name, rate in (r.get("peers") or {}).items():
        if rate:
            out[f"peer {name} tok/s"] = (rate, True, False)
    for e in r.get("ops", []):
        if e.get("gbps"):
            out[f"op {e['op']} {e['backend']} {e['case']} b{e['batch']} GB/s"] = (e["gbps"], True, True)
    for preset, n in (r.get("launches_per_token") or {}).items():
        out[f"launches/token {preset}"] = (n, False, True)
    return out


def compare(a: dict, b: dict, threshold: float) -> tuple[list[tuple], list[str]]:
    """Rows (name, A, B, B/A, verdict) and the names of the regressions."""
    ea, eb = entries(a), entries(b)
    rows, regressions = [], []
    for name in sorted(ea.keys() | eb.keys()):
        if name not in ea or name not in eb:
            rows.append((name, ea.get(name, (None,))[0], eb.get(name, (None,))[0], None,
                         "only in " + ("B" if name in eb else "A")))
            continue
        (va, higher, gated), (vb, _, _) = ea[name], eb[name]
        ratio = vb / va if va else (1.0 if not vb else float("inf"))
        better = ratio if higher else (1 / ratio if ratio else float("inf"))
        verdict = ""
        if better < 1 - threshold:
            verdict = "REGRESSION" if gated else "worse (not gated)"
            if gated:
                regressions.append(name)
        elif better > 1 + threshold:
            verdict = "better"
        rows.append((name, va, vb, ratio, verdict))
    return rows, regressions


def main(path_a: str, path_b: str, threshold: float = 0.05, console: Console | None = None) -> int:
    from nanovllm.bench.results import load

    console = console or Console(soft_wrap=True)
    a, b = load(path_a), load(path_b)
    rows, regressions = compare(a, b, threshold)
    table = Table(title=f"B/A: {escape(str(path_b))} over {escape(str(path_a))} (threshold {threshold:.0%})")
    for col in ("entry", "A", "B", "B/A", ""):
        table.add_column(col, justify="left" if col in ("entry", "") else "right")
    for name, va, vb, ratio, verdict in rows:
        style = "red" if verdict == "REGRESSION" else "green" if verdict == "better" else None
        table.add_row(escape(name), _num(va), _num(vb), "-" if ratio is None else f"{ratio:.3f}", verdict, style=style)
    console.print(table)
    if a.get("gpu") != b.get("gpu"):
        gpus = escape(f"A on {a.get('gpu')}, B on {b.get('gpu')}")
        console.print(f"[yellow]different devices ({gpus}): the ratios compare cards, not code[/]")
    if regressions:
        console.print(f"[red]{len(regressions)} regression(s) beyond {threshold:.0%}[/]")
        return 1
    console.print(f"no regression beyond {threshold:.0%} ({sum(r[3] is not None for r in rows)} entries compared)")
    return 0


def gate(run_path: str, baseline_path: str | None = None, threshold: float = 0.05,
         console: Console | None = None) -> int:
    """Compare a run with a baseline: the given file, else the one of the run's GPU (the GPU this process sees
    when the run names none). 0: no regression; 1: a regression; 2: no usable baseline or run file."""
    from nanovllm.bench import baseline
    from nanovllm.bench.results import load

    console = console or Console(soft_wrap=True)
    try:
        if baseline_path is None:
            baseline_path = str(baseline.find(load(run_path).get("gpu") or _current_gpu()))
        console.print(f"baseline: {escape(baseline_path)}")
        return main(baseline_path, run_path, threshold, console)
    except (OSError, ValueError) as e:  # a missing file, or one that is not JSON
        console.print(f"[red]compare: {escape(str(e))}[/]")
        return 2


def _current_gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _num(x) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 1000 else f"{x:,.0f}"
