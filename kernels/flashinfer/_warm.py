"""Whether FlashInfer's JIT modules are built for a model, and building them in the background when not.

`cold(target)` is the `cold` hook of the FlashInfer attention backends: `auto` passes over FlashInfer until
every module that _jit.py builds for the model's dtype and head size is in FlashInfer's cache (a first
use would otherwise compile for minutes inside the first step). The first time it finds modules missing it
starts _jit.py in a background process (at most one per machine at a time, at lowered priority), so a later
run finds them built. NANOVLLM_FLASHINFER_BACKGROUND_BUILD=0 turns the background build off.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from nanovllm.ops.plugins import load_sibling

jit = load_sibling(__file__, "_jit")


def _state_dir() -> Path:
    root = Path(os.environ.get("NANOVLLM_CACHE") or Path.home() / ".cache" / "nanovllm").expanduser()
    return root / "flashinfer"


def _running(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _build_args(target) -> list[str]:
    args = ["--dtype", str(target.dtype).removeprefix("torch."), "--head-dim", str(target.shapes.get("head_dim", 128))]
    return args + (["--windows"] if target.shapes.get("windows") else []) + (
        ["--softcap"] if target.shapes.get("softcap") else [])


def start_background_build(target) -> Path | None:
    """Run _jit.py for this target in a detached, low-priority process; returns its log (None if turned off)."""
    if os.environ.get("NANOVLLM_FLASHINFER_BACKGROUND_BUILD", "1") == "0":
        return None
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    log_path, pid_file = state / "build.log", state / "build.pid"
    if _running(pid_file):
        return log_path
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, jit.__file__, *_build_args(target)], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: os.nice(10))
    pid_file.write_text(str(proc.pid))
    return log_path


@functools.cache
def _missing(dtype, head_dim: int, windows: bool, softcap: bool) -> int:
    both = (False, True)
    specs = jit.specs(dtype, (head_dim,), both if windows else (False,), both if softcap else (False,))
    return sum(not spec.is_compiled for spec in specs)


def cold(target) -> str | None:
    """Why FlashInfer would compile at first use for this target (modules missing from its cache), or None."""
    try:
        missing = _missing(target.dtype, target.shapes.get("head_dim", 128), bool(target.shapes.get("windows")),
                           bool(target.shapes.get("softcap")))
    except Exception as e:  # a FlashInfer version whose JIT helpers differ: treat as cold, never block
        return f"cannot read its JIT cache ({type(e).__name__}: {e})"
    if not missing:
        return None
    log_path = start_background_build(target)
    building = f"; building them in the background (log: {log_path})" if log_path else ""
    return f"{missing} JIT modules not built yet{building}"
