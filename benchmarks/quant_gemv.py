"""Decode GEMV bandwidth of the quantized weight formats (`triton_quant`) against the dense bf16 Triton GEMV, per
projection of Qwen3-8B and Qwen3-0.6B.

Method (as benchmarks/triton_gemv.py): 50 launches back-to-back in one CUDA graph, launch i reading weight copy
i % copies, with enough copies to overflow L2, so a launch streams its weights from HBM. Bytes read = the
weight's stored bytes (values + scales + offsets; bf16 for dense); GB/s and TB/s = bytes / time per launch.
The first call of each (format, shape, rows) tunes its launch config (--tune-budget seconds each) and records it
in ~/.cache/nanovllm/triton/<gpu>.json, which a later run reads; copy that file to keep the tuning.

    python benchmarks/quant_gemv.py [--rows 1,4] [--formats fp8,int8,int4,int4_zero] [--models 8b,0.6b]
                                    [--tune-budget 15] [--out quant_gemv.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F

from nanovllm.ops import load_plugins
from nanovllm.quant.rtn import quantize
from nanovllm.quant.weights import QuantizedWeight

# model: projection: (N, K); Qwen3-8B: hidden 4096, 32 + 2 x 8 heads of 128, intermediate 12288; 0.6B: 1024, 16 +
# 2 x 8 heads of 128, intermediate 3072
SHAPES = {
    "8b": {"qkv": (6144, 4096), "o_proj": (4096, 4096), "up": (12288, 4096), "gate_up": (24576, 4096),
           "down": (4096, 12288)},
    "0.6b": {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
}
# name: (format, group size (None: per channel), symmetric)
FORMATS = {"fp8": ("fp8", None, True), "fp8_block": ("fp8", 128, True), "int8": ("int8", None, True),
           "int4": ("int4", 128, True), "int4_zero": ("int4", 128, False), "int4_g32": ("int4", 32, True)}
TARGET_TBS = 2.5  # the bar for the quantized GEMVs on the 8B shapes
DEVICE = "cuda"


def timed(tuning, fn, sets: list) -> float:
    """Seconds per call of fn(weight set i) in the graph, rotating over the sets."""
    fn(sets[0])  # tune / compile outside the capture
    return tuning.graph_time(lambda i: fn(sets[i]), len(sets))


def bench_dense(tuning, n: int, k: int, rows: int) -> tuple[float, int]:
    x = torch.randn(rows, k, device=DEVICE).bfloat16()
    w0 = torch.nn.Parameter(torch.randn(n, k, device=DEVICE).mul_(0.02).bfloat16(), requires_grad=False)
    sets = [w0] + [torch.nn.Parameter(w0.detach().clone(), requires_grad=False)
                   for _ in range(tuning.num_copies(w0.nbytes, w0.device) - 1)]
    return timed(tuning, lambda w: torch.ops.nanovllm_triton.gemv(x, w, None, None, None, 0.0), sets), w0.nbytes


def bench_quant(qcore, n: int, k: int, rows: int, spec) -> tuple[float, int, float]:
    """(seconds per launch, bytes read, max abs error against the dequantized reference)."""
    fmt, group, symmetric = spec
    x = torch.randn(rows, k, device=DEVICE).bfloat16()
    w0 = quantize(torch.randn(n, k, device=DEVICE).mul_(0.02).bfloat16(), fmt, group, symmetric)
    want = F.linear(x, w0.dequantize(torch.bfloat16)).float()
    run = lambda w: torch.ops.nanovllm_triton.qgemv(x, *qcore.weight_args(w), None, None, None, 0.0)  # noqa: E731
    err = (run(w0).float() - want).abs().max().item()
    clone = lambda: QuantizedWeight(  # noqa: E731
        w0.format, w0.qweight.clone(), w0.scale.clone(), w0.group_size, k,
        None if w0.offset is None else w0.offset.clone(), dtype=w0.dtype)
    sets = [w0] + [clone() for _ in range(qcore.tuning.num_copies(w0.nbytes(), w0.device) - 1)]
    return timed(qcore.tuning, run, sets), w0.nbytes(), err


def config_of(qcore, spec, n, k, rows) -> str:
    fmt, group, symmetric = spec
    tag = f"{fmt}_{'ch' if group is None else f'g{group}'}" + ("" if symmetric else "_z")
    entry = qcore.tuning.cached(torch.device(DEVICE), f"qgemv_{tag}:bfloat16:N{n}:K{k}:M{qcore.tuning.m_bucket(rows)}")
    if not entry:
        return "untuned"
    return "/".join(str(entry[f]) for f in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1", help="comma-separated batch sizes (rows of x), each <= 16")
    p.add_argument("--formats", default="fp8,int8,int4,int4_zero", help=f"of {','.join(FORMATS)}")
    p.add_argument("--models", default="8b,0.6b", help=f"of {','.join(SHAPES)}")
    p.add_argument("--tune-budget", type=float, default=15.0, help="seconds of tuning per shape (0: no tuning)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in FORMATS] + [m for m in args.models.split(",") if m not in SHAPES]:
        sys.exit(f"unknown formats or models: {unknown}")
    if args.tune_budget <= 0:
        os.environ["NANOVLLM_TRITON_TUNE"] = "0"
    os.environ["NANOVLLM_TRITON_TUNE_BUDGET_S"] = str(args.tune_budget)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("nanovllm.triton").setLevel(logging.INFO)  # one line per tuned shape
    load_plugins()
    qcore = sys.modules["nanovllm_plugins.triton._quant_core"]
    tuning = qcore.tuning
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    print(f"{'model':<6}{'proj':<9}{'rows':>5}{'format':>11}{'MB':>9}{'us':>9}{'GB/s':>8}{'TB/s':>7}"
          f"{'x dense':>8}{'max err':>9}  config")
    rows_out = []
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            for model in args.models.split(","):
                for proj, (n, k) in SHAPES[model].items():
                    dense_s, dense_b = bench_dense(tuning, n, k, rows)
                    results = [("bf16", dense_s, dense_b, 0.0, "")]
                    for name in formats:
                        s, b, err = bench_quant(qcore, n, k, rows, FORMATS[name])
                        results.append((name, s, b, err, config_of(qcore, FORMATS[name], n, k, rows)))
                    for name, s, b, err, cfg in results:
                        r = dict(model=model, proj=proj, n=n, k=k, rows=rows, format=name, mb=round(b / 1e6, 2),
                                 us=round(s * 1e6, 2), gbs=round(b / s / 1e9, 1), tbs=round(b / s / 1e12, 3),
                                 speedup=round(dense_s / s, 2), max_abs_err=err, config=cfg)
                        rows_out.append(r)
                        print(f"{model:<6}{proj:<9}{rows:>5}{name:>11}{r['mb']:>9}{r['us']:>9}{r['gbs']:>8}"
                              f"{r['tbs']:>7}{r['speedup']:>8}{err:>9.3g}  {cfg}", flush=True)
    summary(rows_out, formats)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                  method="50 launches in one CUDA graph, rotating copies", rows=rows_out,
                  seconds=round(time.perf_counter() - t0, 1))
    print(f"done in {result['seconds']} s; tuned configs in {tuning.cache_dir()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def summary(rows_out: list[dict], formats: list[str]) -> None:
    """TB/s per (model, projection, rows) and format; the 8B rows marked against the issue's bar."""
    print(f"\nTB/s of bytes read (weights + scales); bar: >= {TARGET_TBS} TB/s on the 8B shapes")
    names = ["bf16", *formats]
    print(f"{'shape':<22}" + "".join(f"{n:>11}" for n in names))
    keys = dict.fromkeys((r["model"], r["proj"], r["rows"]) for r in rows_out)
    for model, proj, rows in keys:
        mine = [r for r in rows_out if (r["model"], r["proj"], r["rows"]) == (model, proj, rows)]
        got, speed = {r["format"]: r["tbs"] for r in mine}, {r["format"]: r["speedup"] for r in mine}
        cells = []
        for n in names:
            mark = "" if model != "8b" or n == "bf16" else ("+" if got[n] >= TARGET_TBS else "-")
            cells.append(f"{got[n]:>10}{mark or ' '}")
        print(f"{f'{model} {proj} x{rows}':<22}" + "".join(cells)
              + "   time vs bf16: " + " ".join(f"{n} {speed[n]}x" for n in formats))
    print("(+: meets the bar, -: below it)")


if __name__ == "__main__":
    main()
