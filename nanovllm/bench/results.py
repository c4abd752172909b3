"""The results file: what every run records, its name (<date>_<gpu-slug>_<sha>.json) and how it is saved.
It is rewritten after every part of a run, so a run cut short still leaves what it measured.

Runs write under DEFAULT_OUT_DIR, `bench-results/` in the current directory (git-ignored in this repository),
never into the package; `--out-dir` chooses another folder."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from nanovllm.provenance import git_sha, now, versions

DEFAULT_OUT_DIR = Path("bench-results")  # relative: resolved against the working directory of the run
REQUIRED = ("gpu", "git_sha", "date", "versions", "latency", "peers", "throughput", "roofline_tok_s", "ops",
            "launches_per_token")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def file_name(gpu: str, sha: str, date: str) -> str:
    short = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return f"{date[:10]}_{slug(gpu)}_{short}.json"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user types it: `python -m nanovllm.bench ...` rather than the path of its __main__.py."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[0] = "python -m nanovllm.bench"
    return " ".join(argv)


def new(gpu: str, options: dict) -> dict:
    """An empty results record with its provenance; the parts fill it in."""
    return dict(gpu=gpu, git_sha=git_sha(), date=now(), versions=versions(), command=command_line(),
                options=options, presets={}, latency=[], peers={}, peer_details={}, throughput={},
                roofline_tok_s=None, roofline={}, ops=[], ops_skipped=[], launches_per_token={}, profile={},
                model={}, errors={}, notes=[])


def save(results: dict, path: Path) -> Path:
    """Write atomically: a reader (or a killed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def load(path) -> dict:
    return json.loads(Path(path).read_text())
