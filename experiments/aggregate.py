"""Collect Hydra sweeps' results into a table per configuration, a CSV per run and a bar chart.

    python experiments/aggregate.py multirun/<date>/<time> [more sweep dirs ...] [--out DIR]

Every results.json under the sweep dirs is one run, labelled by the overrides that differ between runs
(overrides shared by all runs are the sweep's setting, not a distinction, and are dropped). Runs whose
labels differ only in a repeat key (`engine.seed` by default: the benchmark decodes greedily, so the seed
does not change the work) are repeats of one configuration, as are runs of the same label in several
sweep dirs. Each configuration shows the median and the min-max spread of its repeats; one is named the
fastest only when its slowest repeat beats every other configuration's fastest repeat.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

REPEAT_KEYS = ("engine.seed",)
COLUMNS = ("run", "overrides", "repeat", "decode_tok_s", "prefill_tok_s", "ttft_ms", "pct_roofline",
           "roofline_tok_s", "device", "model")


def load_runs(sweep_dirs: list[Path], repeat_keys=REPEAT_KEYS) -> list[dict]:
    """One dict per results.json, with `label` (the configuration) and `repeat` (the repeat-key overrides)."""
    runs = []
    for sweep_dir in sweep_dirs:
        for path in sorted(sweep_dir.rglob("results.json"), key=_natural):
            r = json.loads(path.read_text())
            overrides = r.get("overrides")
            if overrides is None:  # results written without them: fall back to Hydra's own record
                saved = path.parent / ".hydra" / "overrides.yaml"
                overrides = yaml.safe_load(saved.read_text()) if saved.is_file() else []
            run = str(path.parent.relative_to(sweep_dir)) or "."
            if len(sweep_dirs) > 1:
                run = f"{sweep_dir.name}/{run}"
            runs.append(dict(r, run=run, overrides=overrides))
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    for r in runs:
        distinct = [o for o in r["overrides"] if o not in shared]
        r["repeat"] = " ".join(o for o in distinct if _key(o) in repeat_keys)
        r["label"] = " ".join(o for o in distinct if _key(o) not in repeat_keys)
    return runs


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _natural(path: Path):
    """Sweep job dirs are numbered 0, 1, ... 10: sort them as numbers."""
    return [int(p) if p.isdigit() else -1 for p in path.parent.parts], str(path)


def rows(runs: list[dict]) -> list[dict]:
    """The per-run table (summary.csv)."""
    return [dict(run=r["run"], overrides=r["label"], repeat=r["repeat"], decode_tok_s=r.get("decode_tok_s"),
                 prefill_tok_s=r.get("prefill_tok_s"), ttft_ms=r.get("ttft_ms"),
                 pct_roofline=r.get("pct_roofline"), roofline_tok_s=r.get("roofline_tok_s"),
                 device=r.get("device"), model=(r.get("model") or {}).get("name")) for r in runs]


@dataclass
class Config:
    """One configuration's repeats: decode tok/s of each, and the medians of the other columns."""

    label: str
    runs: list[dict]

    def values(self, column: str) -> list[float]:
        return [r[column] for r in self.runs if r[column]]

    def median(self, column: str) -> float | None:
        values = self.values(column)
        return statistics.median(values) if values else None

    @property
    def decode(self) -> list[float]:
        return self.values("decode_tok_s")

    def spread(self) -> str:
        d = self.decode
        if len(d) < 2:
            return "one run"
        return f"{min(d):,.1f} - {max(d):,.1f}"


def configs(table: list[dict]) -> list[Config]:
    """Runs grouped by label, in the order each label first appears."""
    groups: dict[str, Config] = {}
    for row in table:
        groups.setdefault(row["overrides"], Config(row["overrides"], [])).runs.append(row)
    return list(groups.values())


def _name(config: Config) -> str:
    return config.label or "no overrides"


def verdict(groups: list[Config]) -> str:
    """Which configuration is fastest, or why none is named: single runs, or ranges that overlap."""
    timed = sorted((g for g in groups if g.decode), key=lambda g: g.median("decode_tok_s"), reverse=True)
    if not timed:
        return "fastest: no run reported a decode speed"
    best = timed[0]
    if len(timed) == 1:
        return f"one configuration ({_name(best)}): median {best.median('decode_tok_s'):,.1f} tok/s, nothing to compare"
    if any(len(g.decode) < 2 for g in timed):
        return (f"no fastest named: highest median {_name(best)} at {best.median('decode_tok_s'):,.1f} tok/s, "
                f"but some configurations ran once, so the run-to-run noise is unknown "
                f"(repeat each, e.g. {REPEAT_KEYS[0]}=0,1,2)")
    overlapping = [g for g in timed[1:] if max(g.decode) >= min(best.decode)]
    if overlapping:
        return (f"no fastest named: {_name(best)} ({best.spread()} tok/s) overlaps "
                + ", ".join(f"{_name(g)} ({g.spread()})" for g in overlapping)
                + ": the differences are inside the run-to-run spread")
    runner_up = timed[1]
    return (f"fastest: {_name(best)} at a median {best.median('decode_tok_s'):,.1f} tok/s ({best.spread()}), "
            f"above every repeat of the others (next: {_name(runner_up)}, {runner_up.spread()})")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    return "" if v is None else str(v)


def write_markdown(table: list[dict], path: Path) -> None:
    head = ["overrides", "runs", "decode tok/s (median)", "decode min - max", "prefill tok/s", "TTFT ms",
            "% roofline", "device", "model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in configs(table):
        devices = ", ".join(sorted({str(r["device"]) for r in g.runs}))
        models = ", ".join(sorted({str(r["model"]) for r in g.runs}))
        cells = [_name(g), str(len(g.runs)), _fmt(g.median("decode_tok_s")), g.spread(),
                 _fmt(g.median("prefill_tok_s")), _fmt(g.median("ttft_ms")), _fmt(g.median("pct_roofline")),
                 devices, models]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Medians over each configuration's runs; summary.csv has every run.", "",
              verdict(configs(table))]
    path.write_text("\n".join(lines) + "\n")


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)


def gpu_targets(runs: list[dict]) -> list[float]:
    """The decode targets the runs recorded, from GPU runs only (on a CPU they do not apply)."""
    return sorted({t for r in runs if r.get("device_type") == "cuda" for t in r.get("targets_tok_s") or ()})


def plot(table: list[dict], path: Path, targets=()) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    groups = configs(table)
    x = range(len(groups))
    medians = [g.median("decode_tok_s") or 0.0 for g in groups]
    low = [m - min(g.decode, default=m) for g, m in zip(groups, medians)]
    high = [max(g.decode, default=m) - m for g, m in zip(groups, medians)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    bars = ax.bar(x, medians, yerr=[low, high], capsize=4, color="tab:blue", label="decode tok/s (median, min-max)")
    ax.bar_label(bars, labels=[f"{m:,.1f}" for m in medians], fontsize=8)
    for i, g in enumerate(groups):  # every repeat as a dot over its bar
        ax.scatter([i] * len(g.decode), g.decode, color="black", s=8, zorder=3)
    for y, style in zip(targets, (":", "--", "-.")):
        ax.axhline(y, color="tab:gray", linestyle=style, label=f"GPU target {y:,.0f}")
    roofs = [row["roofline_tok_s"] for row in table if row["roofline_tok_s"]]
    if roofs and max(roofs) - min(roofs) <= 0.01 * max(roofs):  # one device, one context: one line
        ax.axhline(max(roofs), color="tab:red", label=f"roofline {max(roofs):,.0f}")
    elif roofs:  # runs differ in device or context: mark each configuration's own roofline
        ax.scatter(x, [g.median("roofline_tok_s") or float("nan") for g in groups],
                   marker="_", s=600, color="tab:red", label="roofline (per configuration)")
    ax.set_xticks(x, [_name(g) for g in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("batch-1 decode tok/s")
    devices = sorted({str(row["device"]) for row in table})
    ax.set_title(f"decode speed per configuration ({', '.join(devices)})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", type=Path, nargs="+",
                    help="Hydra multirun dirs (any dirs holding results.json files); repeats of one sweep group")
    ap.add_argument("--out", type=Path, help="summary.{md,csv,png} go here (default: the first sweep dir)")
    ap.add_argument("--repeat-key", action="append", dest="repeat_keys",
                    help=f"an override key whose values are repeats of one configuration (default: {REPEAT_KEYS})")
    args = ap.parse_args(argv)
    runs = load_runs(args.sweep_dirs, tuple(args.repeat_keys or REPEAT_KEYS))
    if not runs:
        ap.error(f"no results.json under {', '.join(map(str, args.sweep_dirs))}")
    out = args.out or args.sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs)
    write_markdown(table, out / "summary.md")
    write_csv(table, out / "summary.csv")
    plot(table, out / "summary.png", gpu_targets(runs))
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
