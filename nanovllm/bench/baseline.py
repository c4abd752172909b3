"""Per-GPU baselines that `python -m nanovllm.bench compare` gates a run against.

A baseline is a results file named after its GPU, `benchmarks/baseline/<gpu-slug>.json`, holding the keys that
`compare.entries` reads (latency, throughput, peers, ops, launches_per_token). Its rows may come from different
runs, so every latency row, op row and the throughput entry carries the provenance of the run that measured it
(git_sha, date, versions, command). `merge` folds a run into a baseline: a row replaces the row with the same key
(preset and context for latency; op, backend, case and batch for ops; KEYED_TABLES' fields for the
speculative-decoding, weight-offloading and quantized-decode rows, the last taken from the run's latency rows
that name a quantization), every other row stays. Any preset name is
a valid key, `auto` included.
"""

from __future__ import annotations

from pathlib import Path

from nanovllm.bench.results import slug
from nanovllm.provenance import REPO

BASELINE_SUBDIR = Path("benchmarks") / "baseline"
PROVENANCE = ("git_sha", "date", "versions", "command")
# tables of rows a run replaces by key: {table: (the key's fields, the field a measured row has)}
KEYED_TABLES = {
    "speculative": (("model", "method", "workload", "k", "batch"), "speedup"),
    "offload": (("model", "cpu_offload_gb", "gpu_memory_utilization"), "decode_tok_s"),
    "quantized": (("model", "quantization", "preset", "context"), "decode_tok_s"),
}


def search_dirs() -> list[Path]:
    """Where baselines are looked for: the working directory's benchmarks/baseline (a checkout run from its
    root), then the one next to this package's source checkout."""
    dirs = []
    for d in (Path.cwd() / BASELINE_SUBDIR, REPO / BASELINE_SUBDIR):
        if d.resolve() not in [x.resolve() for x in dirs]:
            dirs.append(d)
    return dirs


def file_name(gpu: str) -> str:
    return f"{slug(gpu)}.json"


def find(gpu: str) -> Path:
    """The baseline file of `gpu`; FileNotFoundError naming every place looked at when there is none."""
    if not gpu:
        raise FileNotFoundError("the results file names no GPU; pass the baseline explicitly with --baseline PATH")
    candidates = [d / file_name(gpu) for d in search_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no baseline for GPU {gpu!r} (looked for {looked}); pass one with --baseline PATH, "
                            f"or create it with `python -m nanovllm.bench baseline RUN.json`")


def default_path(gpu: str) -> Path:
    """Where `merge` writes a new baseline of `gpu` when none exists yet."""
    return search_dirs()[0] / file_name(gpu)


def _key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row.get(f) for f in fields)


def _provenance(run: dict) -> dict:
    return {k: run.get(k) for k in PROVENANCE}


def merge(baseline: dict | None, run: dict, presets: tuple[str, ...] | None = None) -> dict:
    """`baseline` with `run`'s rows folded in (a new dict; neither argument changes). `presets` limits the
    latency, throughput and launch rows taken to those presets; peers and ops are taken whenever present."""
    if baseline and run.get("gpu") and baseline.get("gpu") and baseline["gpu"] != run["gpu"]:
        raise ValueError(f"the run is on {run['gpu']!r}, the baseline on {baseline['gpu']!r}: one GPU per baseline")
    base = dict(baseline or {})
    out = dict(gpu=run.get("gpu") or base.get("gpu"), latency=list(base.get("latency", [])),
               throughput=dict(base.get("throughput") or {}), peers=dict(base.get("peers") or {}),
               ops=list(base.get("ops", [])), launches_per_token=dict(base.get("launches_per_token") or {}),
               peers_provenance=base.get("peers_provenance"))

    def wanted(preset: str | None) -> bool:
        return presets is None or preset in presets

    prov = _provenance(run)
    taken = [dict(row, **prov) for row in run.get("latency", []) if wanted(row.get("preset"))]
    keys = {(row["preset"], row["context"]) for row in taken}
    out["latency"] = [r for r in out["latency"] if (r["preset"], r["context"]) not in keys] + taken
    out["latency"].sort(key=lambda r: (r["preset"], r["context"]))
    for preset, n in (run.get("launches_per_token") or {}).items():
        if wanted(preset):
            out["launches_per_token"][preset] = n
    th = run.get("throughput") or {}
    if th.get("output_tok_s") and th.get("complete", True) and wanted(th.get("preset")):
        out["throughput"] = dict(th, **prov)
    if any(run.get("peers", {}).values()):
        out["peers"] = {k: v for k, v in run["peers"].items() if v}
        out["peers_provenance"] = prov
    ops = [dict(row, **prov) for row in run.get("ops", []) if row.get("gbps")]
    op_key = lambda r: (r["op"], r["backend"], r["case"], r["batch"])  # noqa: E731
    new_keys = {op_key(r) for r in ops}
    out["ops"] = [r for r in out["ops"] if op_key(r) not in new_keys] + ops
    # batch-1 decode of quantized weights, per model (the latency table holds the default model's presets)
    quantized = [dict(row, gpu=out["gpu"]) for row in run.get("latency", []) if row.get("quantization")]
    for table, (fields, measured) in KEYED_TABLES.items():
        source = quantized if table == "quantized" else run.get(table, [])
        rows = [dict(row, **prov) for row in source if row.get(measured)]
        new_keys = {_key(r, fields) for r in rows}
        out[table] = [r for r in base.get(table, []) if _key(r, fields) not in new_keys] + rows
    return out
