"""benchmarks/constrained_decode.py on the CPU with the tiny model: which requests each kind changes, and a
whole run's table, JSON and profiles."""

from __future__ import annotations

import json
import runpy

import pytest

from tests.helpers import ROOT

pytest.importorskip("xgrammar")
SCRIPT = runpy.run_path(str(ROOT / "benchmarks" / "constrained_decode.py"))


def test_each_kind_changes_an_exact_share_of_the_requests():
    args = SCRIPT["parse_args"](["--fraction", "0.25"])
    params = {kind: [SCRIPT["sampling_params"](kind, i, args) for i in range(8)] for kind in SCRIPT["KINDS"]}
    assert [i for i, p in enumerate(params["both"]) if p.structured is not None and p.penalized] == [3, 7]
    assert [i for i, p in enumerate(params["grammar"]) if p.structured is not None and not p.penalized] == [3, 7]
    assert [i for i, p in enumerate(params["penalties"]) if p.penalized and p.structured is None] == [3, 7]
    assert not any(p.structured is not None or p.penalized for p in params["plain"])


def test_bad_arguments_are_named(capsys):
    for argv, named in ((["--kinds", "plain,fast"], "unknown fast"), (["--fraction", "0"], "--fraction")):
        with pytest.raises(SystemExit):
            SCRIPT["parse_args"](argv)
        assert named in capsys.readouterr().err


def test_a_run_prints_and_writes_each_kind(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = SCRIPT["main"](["--model", "tiny", "--device", "cpu", "--num-prompts", "4", "--max-tokens", "4",
                             "--fraction", "0.5", "--kinds", "plain,both", "--repeat", "1", "--out", str(out),
                             "--profile", str(tmp_path / "prof")])
    assert set(result["tok_s"]) == {"plain", "both"} and all(v > 0 for v in result["tok_s"].values())
    assert json.loads(out.read_text())["config"]["fraction"] == 0.5
    assert "both" in capsys.readouterr().out
    assert json.loads((tmp_path / "prof" / "both.json").read_text())["traceEvents"]
    assert "Self CPU" in (tmp_path / "prof" / "plain.txt").read_text()
