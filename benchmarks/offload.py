"""Weight offloading: batch-1 decode tok/s with `cpu_offload_gb` against the bound its copies set.

Every decode step streams the offloaded bytes over PCIe and reads the resident ones from HBM, so

    bound tok/s = 1 / (offloaded_bytes / h2d_bandwidth + resident_bytes / hbm_bandwidth)

with the host-to-device bandwidth measured here (page-locked copies of one offloaded layer's size, CUDA events)
and the HBM bandwidth from nanovllm/roofline.py (the card's measured weight-read rate, else a device copy).
The resident run (cpu_offload_gb=0, no memory cap) comes first when the model fits the card: it gives the greedy
tokens the offloaded run must repeat exactly, and its own tok/s against the HBM-only bound.

    python benchmarks/offload.py                                        # qwen3-8b-random, 8 GiB offloaded
    python benchmarks/offload.py --model qwen3-14b-random --gpu-memory-gib 16   # 14B under a 16 GiB cap

--gpu-memory-gib caps the engine at that much of the card (gpu_memory_utilization = cap / card) and, unless
--cpu-offload-gb is given, offloads what the engine's fit check would ask for plus --headroom-gib for the KV
cache and activations. Prints a table; --out writes the JSON rows (model, cpu_offload_gb, decode_tok_s,
fraction_of_bound, gpu, and the bandwidths); --baseline folds them into a GPU baseline JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench.baseline import merge  # noqa: E402
from nanovllm.engine.weight_offload import GIB, offloadable_tensors, suggest_offload_gib, weight_bytes  # noqa: E402
from nanovllm.provenance import git_sha, now, versions  # noqa: E402
from nanovllm.roofline import device_bandwidth  # noqa: E402
from nanovllm.speed import prompt_ids, stream_times  # noqa: E402

ENGINE = dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=1024)


def model_sizes(model: str) -> tuple[int, int]:
    """(bytes of every weight in bf16, bytes of the largest layer's offloadable weights), from the config alone."""
    from nanovllm.checkpoints import resolve_model
    from nanovllm.config import KernelConfig
    from nanovllm.models.dense import deferred_weights
    from nanovllm.models.loader import load_hf_config
    from nanovllm.models.registry import build_model, model_target
    from nanovllm.ops import OpResolver

    hf = load_hf_config(resolve_model(model))
    resolver = OpResolver(vars(KernelConfig()), model_target(hf, "cpu", torch.bfloat16), hf.num_hidden_layers, {})
    with torch.device("cpu"), deferred_weights():
        meta = build_model(hf, resolver)
    return weight_bytes(meta, torch.bfloat16), max(sum(t.values()) for t in offloadable_tensors(meta, torch.bfloat16))


def h2d_bandwidth(nbytes: int, device: str, reps: int = 20) -> float:
    """Bytes/s of back-to-back page-locked host-to-device copies of `nbytes`."""
    cuda = device == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=cuda)
    sync()
    return nbytes * reps / (time.perf_counter() - t0)


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def decode(llm, tokens: int) -> tuple[float, list[int]]:
    """(median tok/s, greedy token ids) of one batch-1 request, after a warm-up one."""
    stream_times(llm, prompt_ids(llm.tokenizer, 64, tag=8), 8)  # graphs, allocator and autotuning off the clock
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    stamps, ids = [], []
    for out in llm.stream([prompt_ids(llm.tokenizer, 64, tag=7)], params):  # each yield: the new tokens
        if out["token_ids"]:
            stamps.append((time.perf_counter(), len(out["token_ids"])))
            ids += out["token_ids"]
    per_token = [(t - prev) / n for (prev, _), (t, n) in zip(stamps, stamps[1:])]
    return 1.0 / statistics.median(per_token), ids


def run(model: str, offload_gib: float, utilization: float, tokens: int, bw: dict, device: str) -> dict:
    with LLM(model, device=device, cpu_offload_gb=offload_gib, gpu_memory_utilization=utilization,
             **ENGINE) as llm:
        runner = llm.engine.runner
        offloaded = runner.offloader.offloaded_bytes if runner.offloader else 0
        total = sum(p.nbytes for p in runner.model.parameters())
        layers = sorted(runner.offloader.order) if runner.offloader else []
        tok_s, ids = decode(llm, tokens)
    bound = 1.0 / (offloaded / bw["h2d"] + (total - offloaded) / bw["hbm"])
    return dict(model=model, cpu_offload_gb=offload_gib, decode_tok_s=tok_s, fraction_of_bound=tok_s / bound,
                bound_tok_s=bound, offloaded_gib=offloaded / GIB, resident_gib=(total - offloaded) / GIB,
                offloaded_layers=layers, gpu_memory_utilization=utilization, h2d_gb_s=bw["h2d"] / 1e9,
                hbm_gb_s=bw["hbm"] / 1e9, hbm_source=bw["hbm_source"], gpu=gpu_name(device),
                decode_tokens=tokens, token_ids=ids)


def fold_into_baseline(path: Path, rows: list[dict]) -> None:
    """Writes `rows` into the baseline at `path` (created if missing) under `offload`, with this run's provenance."""
    run = dict(gpu=rows[0]["gpu"], git_sha=git_sha(), date=now(), versions=versions(), command=" ".join(sys.argv),
               offload=rows)
    old = json.loads(path.read_text()) if path.is_file() else None
    path.write_text(json.dumps(merge(old, run), indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-8b-random")
    p.add_argument("--cpu-offload-gb", type=float, default=None, help="GiB offloaded (default 8, or with "
                   "--gpu-memory-gib what the cap needs)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap the engine at this much of the card")
    p.add_argument("--headroom-gib", type=float, default=1.5, help="with --gpu-memory-gib: room kept for the "
                   "KV cache and activations")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--skip-resident", action="store_true", help="no resident run (no greedy check)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--baseline", default=None, help="a GPU baseline JSON (benchmarks/baseline/<gpu>.json) to fold "
                   "the rows into, under `offload`")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script (--model tiny)")
    a = p.parse_args()
    def memory() -> tuple[int, int]:  # (free, total) bytes of the card now
        return torch.cuda.mem_get_info() if a.device == "cuda" else (1 << 40, 1 << 40)

    free, card = memory()
    weights, largest_layer = model_sizes(a.model)
    bw = dict(h2d=h2d_bandwidth(largest_layer, a.device))
    bw["hbm"], bw["hbm_source"] = device_bandwidth(gpu_name(a.device), a.device)
    rows = []
    if not a.skip_resident and weights < 0.85 * free:
        rows.append(run(a.model, 0.0, 0.9, a.decode_tokens, bw, a.device))
    utilization, offload = 0.9, a.cpu_offload_gb if a.cpu_offload_gb is not None else 8.0
    if a.gpu_memory_gib is not None:
        free, card = memory()
        utilization = a.gpu_memory_gib * GIB / card
        if a.cpu_offload_gb is None:  # what the engine's fit check asks for, and room for the KV cache
            available = a.gpu_memory_gib * GIB - (card - free) - a.headroom_gib * GIB
            offload = max(0.0, suggest_offload_gib(weights, largest_layer, int(available)))
    rows.append(run(a.model, offload, utilization, a.decode_tokens, bw, a.device))
    if len(rows) == 2:
        rows[1]["greedy_identical"] = rows[1]["token_ids"] == rows[0]["token_ids"]
    print(f"{a.model} ({weights / GIB:.1f} GiB of weights) on {rows[0]['gpu']}: host-to-device "
          f"{bw['h2d'] / 1e9:.1f} GB/s, HBM {bw['hbm'] / 1e9:.0f} GB/s ({bw['hbm_source']})")
    print(f"{'cpu_offload_gb':>15}{'cap GiB':>9}{'offloaded':>11}{'layers':>8}{'tok/s':>9}{'bound':>9}"
          f"{'of bound':>10}{'greedy':>8}")
    for r in rows:
        cap = f"{r['gpu_memory_utilization'] * card / GIB:.1f}"
        same = {True: "same", False: "DIFF"}.get(r.get("greedy_identical"), "-")
        print(f"{r['cpu_offload_gb']:>15.2f}{cap:>9}{r['offloaded_gib']:>10.2f}G{len(r['offloaded_layers']):>8}"
              f"{r['decode_tok_s']:>9.2f}{r['bound_tok_s']:>9.2f}{r['fraction_of_bound']:>10.1%}{same:>8}")
    for r in rows:
        r.pop("token_ids")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    if a.baseline:
        fold_into_baseline(Path(a.baseline), rows)
    if any(r.get("greedy_identical") is False for r in rows):
        sys.exit("offloaded greedy tokens differ from the resident run's")


if __name__ == "__main__":
    main()
