"""plot RUN.json --out x.png: batch-1 decode tok/s per preset at one context, with horizontal lines for
the roadmap targets, the peers and the roofline."""

from __future__ import annotations

from pathlib import Path

from nanovllm.bench.report import TARGETS

PEER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:olive")


def plot(r: dict, out: Path, context: int = 128) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({e["context"] for e in r["latency"]})
    if not contexts:
        raise ValueError("the results have no latency entries to plot")
    ctx = context if context in contexts else contexts[0]  # quick runs use smaller contexts
    bars = [(e["preset"], e["decode_tok_s"]) for e in r["latency"] if e["context"] == ctx]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 4), 4.5))
    drawn = ax.bar([p for p, _ in bars], [v for _, v in bars], color="tab:blue", label="nano-vllm presets")
    ax.bar_label(drawn, fmt="%.0f", padding=2)
    for target, style in zip(TARGETS, ("--", "-.")):
        ax.axhline(target, color="grey", linestyle=style, linewidth=1, label=f"target {target:.0f}")
    for color, (name, rate) in zip(PEER_COLORS, (r.get("peers") or {}).items()):
        if rate:
            ax.axhline(rate, color=color, linestyle=":", linewidth=1.5, label=f"{name} {rate:.0f}")
    if r.get("roofline_tok_s"):
        ax.axhline(r["roofline_tok_s"], color="tab:red", linewidth=1.5, label=f"roofline {r['roofline_tok_s']:.0f}")
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title(f"{r['gpu']}, context {ctx}, {r['git_sha'][:12]}, {r['date'][:10]}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
