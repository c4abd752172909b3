"""Build the FlashInfer JIT modules the plugins use, several at once, before first use.

FlashInfer compiles each kernel module on first use, one module at a time (tens of seconds each). Here every module
is built by its own ninja run in its own build directory, exactly as FlashInfer's run-time `build()` does, a few
modules in parallel: the run-time check then finds them up to date. (FlashInfer's `build_jit_specs` runs one
combined ninja from another directory, whose log the run-time ninja never sees, so the first engine build would
rebuild every module, serially.)
The module list must match what the plugins ask for at run time (same dtypes, head_dim, index dtype,
variants), else they build at run time.

    python3 kernels/flashinfer/_jit.py [--dtype bfloat16] [--head-dim 128[,64,256]] [--windows] [--softcap]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

PREFILL_BACKEND = "fa2"  # keep in step with _common.PREFILL_BACKEND


def specs(dtype: torch.dtype, head_dims=(128,), windows=(False,), softcaps=(False,)) -> list:
    from flashinfer.jit import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.activation import gen_act_and_mul_module
    from flashinfer.jit.cascade import gen_cascade_module
    from flashinfer.jit.norm import gen_norm_module
    from flashinfer.jit.rope import gen_rope_module
    from flashinfer.jit.sampling import gen_sampling_module

    out = []
    for head_dim, window, softcap in itertools.product(head_dims, windows, softcaps):
        # (q, kv, o dtypes, index dtype, head_dim qk/vo, pos-encoding NONE, window, softcap[, fp16 qk reduction])
        out.append(gen_batch_decode_module(dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, window, softcap))
        out.append(gen_batch_prefill_module(PREFILL_BACKEND, dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0,
                                            window, softcap, False))
    return out + [gen_cascade_module(), gen_norm_module(), gen_rope_module(), gen_act_and_mul_module("silu"),
                  gen_sampling_module()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head-dim", default="128", help="comma list: every model's head_dim")
    p.add_argument("--windows", action="store_true", help="also the sliding-window attention variants")
    p.add_argument("--softcap", action="store_true", help="also the logit soft-cap attention variants")
    a = p.parse_args()
    t0 = time.perf_counter()
    head_dims = tuple(int(d) for d in a.head_dim.split(","))
    todo = specs(getattr(torch, a.dtype), head_dims, (False, True) if a.windows else (False,),
                 (False, True) if a.softcap else (False,))
    cpus = os.cpu_count() or 4
    parallel = min(len(todo), 4)
    os.environ["MAX_JOBS"] = str(max(1, cpus // parallel))  # ninja jobs per module: the cores, shared
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda spec: spec.build(need_lock=True), todo))
    print(f"built {len(todo)} FlashInfer modules in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(s.name for s in todo), flush=True)


if __name__ == "__main__":
    main()
