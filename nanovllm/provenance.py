"""Facts recorded with every measured number: git sha, library versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# distribution name -> key in the results file; missing ones are recorded as None
LIBRARIES = {"torch": "torch", "triton": "triton", "transformers": "transformers",
             "flashinfer-python": "flashinfer", "hydra-core": "hydra"}


def git_sha() -> str:
    """$NANOVLLM_GIT_SHA if set (a copy of the tree without .git), else HEAD of the
    checkout with "-dirty" when tracked files differ from it; "unknown" outside git."""
    if os.environ.get("NANOVLLM_GIT_SHA"):
        return os.environ["NANOVLLM_GIT_SHA"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist, key in LIBRARIES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
