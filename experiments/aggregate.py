"""Collect a Hydra sweep's results into a table, a CSV and a bar chart.

    python experiments/aggregate.py multirun/<date>/<time> [--out DIR]

Every results.json under the sweep dir is one row, labelled by the overrides that differ between runs
(overrides shared by all runs are the sweep's setting, not a distinction, and are dropped).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

TARGETS = (230.0, 400.0)
COLUMNS = ("run", "overrides", "decode_tok_s", "prefill_tok_s", "ttft_ms", "pct_roofline", "roofline_tok_s",
           "device", "model")


def load_runs(sweep_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_natural):
        r = json.loads(path.read_text())
        overrides = r.get("overrides")
        if overrides is None:  # results written without them: fall back to Hydra's own record
            saved = path.parent / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(saved.read_text()) if saved.is_file() else []
        runs.append(dict(r, run=str(path.parent.relative_to(sweep_dir)) or ".", overrides=overrides))
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    for r in runs:
        r["label"] = " ".join(o for o in r["overrides"] if o not in shared) or r["run"]
    return runs


def _natural(path: Path):
    """Sweep job dirs are numbered 0, 1, ... 10: sort them as numbers."""
    return [int(p) if p.isdigit() else -1 for p in path.parent.parts], str(path)


def rows(runs: list[dict]) -> list[dict]:
    return [dict(run=r["run"], overrides=r["label"], decode_tok_s=r.get("decode_tok_s"),
                 prefill_tok_s=r.get("prefill_tok_s"), ttft_ms=r.get("ttft_ms"),
                 pct_roofline=r.get("pct_roofline"), roofline_tok_s=r.get("roofline_tok_s"),
                 device=r.get("device"), model=(r.get("model") or {}).get("name")) for r in runs]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    return "" if v is None else str(v)


def fastest(table: list[dict]) -> str:
    """The line that names the fastest mix of the sweep."""
    timed = [row for row in table if row["decode_tok_s"]]
    if not timed:
        return "fastest: no run reported a decode speed"
    best = max(timed, key=lambda row: row["decode_tok_s"])
    return f"fastest: run {best['run']} ({best['overrides'] or 'no overrides'}) at {best['decode_tok_s']:,.1f} tok/s"


def write_markdown(table: list[dict], path: Path) -> None:
    head = ["run", "overrides", "decode tok/s", "prefill tok/s", "TTFT ms", "% roofline", "roofline tok/s",
            "device", "model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in COLUMNS) + " |" for row in table]
    lines += ["", fastest(table)]
    path.write_text("\n".join(lines) + "\n")


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [row["overrides"] for row in table]
    decode = [row["decode_tok_s"] or 0.0 for row in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(table) + 2), 4.5))
    bars = ax.bar(range(len(table)), decode, color="tab:blue", label="decode tok/s")
    ax.bar_label(bars, labels=[f"{d:,.1f}" for d in decode], fontsize=8)
    for y, style, name in ((TARGETS[0], ":", "target 230"), (TARGETS[1], "--", "target 400")):
        ax.axhline(y, color="tab:gray", linestyle=style, label=name)
    roofs = [row["roofline_tok_s"] for row in table if row["roofline_tok_s"]]
    if roofs and max(roofs) - min(roofs) <= 0.01 * max(roofs):  # one device, one context: one line
        ax.axhline(max(roofs), color="tab:red", label=f"roofline {max(roofs):,.0f}")
    elif roofs:  # runs differ in device or context: mark each run's own roofline
        ax.scatter(range(len(table)), [row["roofline_tok_s"] or float("nan") for row in table],
                   marker="_", s=600, color="tab:red", label="roofline (per run)")
    ax.set_xticks(range(len(table)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("batch-1 decode tok/s")
    devices = sorted({str(row["device"]) for row in table})
    ax.set_title(f"decode speed per run ({', '.join(devices)})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (any dir holding results.json files)")
    ap.add_argument("--out", type=Path, help="summary.{md,csv,png} go here (default: sweep_dir)")
    args = ap.parse_args(argv)
    runs = load_runs(args.sweep_dir)
    if not runs:
        ap.error(f"no results.json under {args.sweep_dir}")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs)
    write_markdown(table, out / "summary.md")
    write_csv(table, out / "summary.csv")
    plot(table, out / "summary.png")
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
