"""Human-readable tables of a results record (what the CLI prints at the end of a run)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

TARGETS = (230.0, 400.0)  # batch-1 decode tok/s: the original roadmap reached 230 and aimed at 400+


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def latency_table(r: dict) -> Table:
    t = Table(title=f"batch-1 decode on {escape(r['gpu'])} (targets {', '.join(f'{x:.0f}' for x in TARGETS)} tok/s)")
    for col in ("preset", "context", "tok/s", "median ms", "p90 ms", "% roofline", "launches/token"):
        t.add_column(col, justify="left" if col == "preset" else "right")
    for e in r["latency"]:
        t.add_row(escape(e["preset"]), str(e["context"]), _f(e["decode_tok_s"]), _f(e["median_ms"], ".3f"),
                  _f(e["p90_ms"], ".3f"), _f(e["pct_roofline"]), _f(r["launches_per_token"].get(e["preset"]), ".0f"))
    return t


def summary_table(r: dict) -> Table:
    t = Table(title="peers, throughput, roofline")
    t.add_column("what")
    t.add_column("tok/s", justify="right")
    t.add_column("note")
    for name, rate in r["peers"].items():
        d = r["peer_details"].get(name, {})
        t.add_row(f"peer {escape(name)}", _f(rate), escape((d.get("error") or d.get("method") or "")[:100]))
    if r["throughput"]:
        th = r["throughput"]
        t.add_row("throughput (output)", _f(th["output_tok_s"], ".0f"),
                  f"{th['num_requests']} requests, {th['generated_tokens']} tokens, preset {th['preset']}")
    if r["roofline_tok_s"]:
        source = escape(r["bandwidth_source"])
        t.add_row("roofline", _f(r["roofline_tok_s"], ".0f"),
                  f"context {r['roofline_context']}, {r['bandwidth'] / 1e12:.3f} TB/s ({source})")
    return t


def ops_table(r: dict, limit: int = 60) -> Table:
    t = Table(title=f"ops (GB/s; % of {r.get('bandwidth', 0) / 1e12:.2f} TB/s)")
    for col in ("op", "backend", "case", "batch", "µs", "GB/s", "%", "method"):
        t.add_column(col, justify="right" if col in ("batch", "µs", "GB/s", "%") else "left")
    for e in r["ops"][:limit]:
        t.add_row(e["op"], e["backend"], escape(e["case"]), str(e["batch"]), _f(e.get("time_us"), ".2f"),
                  _f(e.get("gbps"), ".1f"), _f(e.get("pct_bandwidth")),
                  escape(e.get("method") or e.get("error", "")[:60]))
    return t


def print_summary(r: dict, console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    for summary in r["profile"].values():
        print_profile(summary, console)
    if r["ops"]:
        console.print(ops_table(r))
    if r["latency"]:
        console.print(latency_table(r))
    console.print(summary_table(r))
    for note in r["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for name, err in r["errors"].items():
        console.print(f"[red]error in {escape(name)}:[/] {escape(err[:400])}", highlight=False)


def print_profile(s: dict, console: Console) -> None:
    batch = f" (batch {s['batch']})" if s.get("batch", 1) > 1 else ""
    console.print(f"[bold]{escape(s['preset'])}[/]{batch} on {escape(s['gpu'])}: [bold]{s['launches_per_step']:.1f}[/] "
                  f"{s['unit']} per decode step ({s['copies_per_step']:.1f} copies; host launch calls "
                  f"{s['host_launches_per_step']:.1f}, of them graph launches {s['graph_launches_per_step']:.1f}); "
                  f"busy {s['busy_us_per_step']:.1f} µs/step, on the critical path "
                  f"{s.get('critical_us_per_step', s['busy_us_per_step']):.1f}, copies "
                  f"{s.get('copy_us_per_step', 0.0):.1f}, idle {s.get('idle_us_per_step', 0.0):.1f}")
    if s.get("eager"):
        e = s["eager"]
        console.print(f"same steps without CUDA graphs: {e['launches_per_step']:.1f} kernels, host launch calls "
                      f"{e['host_launches_per_step']:.1f}, busy {e['busy_us_per_step']:.1f} µs/step")
    if s.get("note"):
        console.print(f"[yellow]{escape(s['note'])}[/]")
    kinds = Table(title="time per op kind (µs per step)")
    kinds.add_column("kind")
    kinds.add_column("µs/step", justify="right")
    for k, us in s["us_per_step_by_kind"].items():
        kinds.add_row(k, f"{us:.1f}")
    console.print(kinds)
    top = Table(title=f"top {len(s['top'])} kernels")
    for col in ("kernel", "kind", "calls/step", "µs/step", "mean µs", "critical µs/step"):
        top.add_column(col, justify="left" if col in ("kernel", "kind") else "right")
    for t in s["top"]:  # critical: the part past every earlier kernel's end (PDL overlaps the rest)
        top.add_row(escape(t["name"][:90]), t["kind"], f"{t['calls_per_step']:.1f}", f"{t['us_per_step']:.1f}",
                    f"{t['mean_us']:.2f}", f"{t.get('critical_us_per_step', t['us_per_step']):.1f}")
    console.print(top)
    if s.get("top_by_site"):
        sites = Table(title="critical path by kernel and the kernel launched before it")
        for col in ("kernel", "after", "calls/step", "µs/step", "critical µs/step", "mean lead µs"):
            sites.add_column(col, justify="left" if col in ("kernel", "after") else "right")
        for t in s["top_by_site"]:  # lead: how long before the kernel before it ended it started
            sites.add_row(escape(t["name"][:60]), escape(t["after"][:40]), f"{t['calls_per_step']:.1f}",
                          f"{t['us_per_step']:.1f}", f"{t['critical_us_per_step']:.1f}", f"{t['mean_lead_us']:.2f}")
        console.print(sites)
