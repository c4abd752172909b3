"""The results file: what every run records, its name (<date>_<gpu-slug>_<sha>.json) and how it is saved.
It is rewritten after every part of a run, so a run cut short still leaves what it measured."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from nanovllm.provenance import REPO, git_sha, now, versions

RESULTS_DIR = REPO / "benchmarks" / "results"
REQUIRED = ("gpu", "git_sha", "date", "versions", "latency", "peers", "throughput", "roofline_tok_s", "ops",
            "launches_per_token")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def file_name(gpu: str, sha: str, date: str) -> str:
    short = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return f"{date[:10]}_{slug(gpu)}_{short}.json"


def new(gpu: str, options: dict) -> dict:
    """An empty results record with its provenance; the parts fill it in."""
    return dict(gpu=gpu, git_sha=git_sha(), date=now(), versions=versions(), command=" ".join(sys.argv),
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
