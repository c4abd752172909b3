"""Helpers shared by every test area: the repository's root, the tiny Qwen3 shape and how its checkpoints are
drawn, the environment a test gives the project's entry points when it runs them in a subprocess, and the
subprocess that runs Triton kernel tests under the interpreter, and Triton's compile for Hopper without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, max_position_embeddings=1024)


def randomize_constants(model, norm_center: float = 1.0):
    """Draw the parameters HF initializes to constants at random too (norms around `norm_center`, biases,
    MoE routers scaled up), so a swapped or skipped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(norm_center + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save_with_tokenizer(model, dest, tokenizer_dir):
    """An HF folder: the model's weights and config, plus the tokenizer files of `tokenizer_dir`."""
    model.save_pretrained(dest)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m nanovllm...` in a child process: this checkout first on PYTHONPATH (so the
    child runs the code under test, whatever is installed), no progress bars, Hydra's full tracebacks."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, NANOVLLM_PROGRESS="0", HYDRA_FULL_ERROR="1", **extra)


def run_under_the_interpreter(test_file: str, names: Iterable[str], durations: int) -> None:
    """Run the tests `names` of `test_file` in a fresh `python -m pytest` with TRITON_INTERPRET=1 set before any
    plugin is imported (Triton picks the interpreter when a kernel is decorated, and plugin files are imported once
    per process), without the pytest plugins those tests do not use; print its output and the slowest
    `durations` tests, and fail with that output when any of them fails."""
    t0 = time.perf_counter()
    tests = [f"{test_file}::{name}" for name in names]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--durations={durations}",
                           *tests],
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-6000:], proc.stderr[-2000:], f"interpreter run: {time.perf_counter() - t0:.1f} s", sep="\n")
    assert proc.returncode == 0, "interpreter run failed:\n" + proc.stdout[-6000:] + proc.stderr[-2000:]


def marked_tests(namespace: dict, mark) -> list[str]:
    """The names of the test functions in `namespace` (a test module's globals()) that carry `mark`."""
    return [name for name, fn in namespace.items()
            if name.startswith("test_") and mark in getattr(fn, "pytestmark", [])]


def compile_for_hopper(kernel, const: dict, pointers: dict[str, str], num_warps: int = 4):
    """`kernel` (a @triton.jit function) compiled to sm_90 machine code with the constexprs `const`: every other
    `*_ptr` argument a 16-byte aligned pointer (as the JIT specializes them) of the type `pointers` names (bf16
    when unnamed), `eps` an fp32 scalar, the rest int32. The interpreter runs any Python; the GPU compiler is
    stricter (constexpr control flow, layouts, vector loads). Skips the test when no sm_90 compiler is here."""
    import pytest
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name], attrs[(i,)] = pointers.get(name, "*bf16"), [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    try:
        return triton.compile(ASTSource(kernel, signature, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))
    except (RuntimeError, FileNotFoundError) as e:
        if "ptxas" in str(e) or "backend" in str(e).lower():
            pytest.skip(f"no sm_90 compiler here: {e}")
        raise
