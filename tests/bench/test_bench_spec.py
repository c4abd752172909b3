"""`python -m nanovllm.bench spec --quick` on the CPU: rows with model, method, workload, speedup and gpu; the
oracle accepts every draft and both proposers keep greedy output identical; baseline folds the rows."""

from __future__ import annotations

import json

import pytest

from nanovllm.bench import baseline
from nanovllm.bench.__main__ import main as bench_main
from nanovllm.bench.spec import load_prompts


def test_workload_ships_grounded_prompts():
    prompts = load_prompts()
    assert 20 <= len(prompts) <= 32 and all(len(p) > 200 for p in prompts)


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec")
    assert bench_main(["spec", "--quick", "--num-prompts", "2", "--max-tokens", "9", "--repeats", "1",
                       "--out-dir", str(out), "engine.enforce_eager=true"]) == 0
    (path,) = out.glob("spec_*.json")
    return json.loads(path.read_text())


def test_rows(spec_run):
    rows = {r["method"]: r for r in spec_run["speculative"]}
    assert set(rows) == {"ngram", "oracle"}
    for row in rows.values():
        assert {"model", "method", "workload", "speedup", "gpu"} <= set(row) and row["identical"]
        assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0 and row["verify_cost"] > 0
        assert row["verify_gpu_ms"] is None and row["decode_gpu_ms"] is None  # kernel time: on a GPU only
        assert row["verify_kernels"] == row["decode_kernels"] == {}
    assert rows["oracle"]["workload"] == "oracle" and rows["ngram"]["workload"] == "grounded"
    # every oracle draft is kept: k + 1 tokens per verify step but the last (cut short by max_tokens)
    assert rows["oracle"]["acceptance_rate"] == 1.0 and rows["oracle"]["mean_accepted_length"] >= 4
    assert rows["oracle"]["tokens_per_step"] >= 3.5 and 1.0 <= rows["ngram"]["tokens_per_step"] < 4.0


def test_baseline_folds_rows(spec_run):
    merged = baseline.merge(None, spec_run)
    assert len(merged["speculative"]) == 2
    again = baseline.merge(merged, spec_run)
    assert len(again["speculative"]) == 2 and again["speculative"][0]["git_sha"] == spec_run["git_sha"]


def test_oracle_reruns_until_its_continuation_settles(monkeypatch):
    """Each speculative run agrees with the continuation it was proposed up to a later point than the run before
    (a stand-in for bf16 near-ties that fall with the steps): the oracle keeps the run that gave back its input."""
    from nanovllm.bench import spec
    from nanovllm.engine.spec.oracle import OracleProposer

    settled = [5, 6, 7, 8]
    runs = []

    def run_batch1(llm, prompts, max_tokens):
        proposed = oracle.continuations[tuple(prompts[0])]
        agree = next((i for i, (a, b) in enumerate(zip(proposed, settled)) if a != b), len(settled))
        runs.append(agree)
        return [settled[:agree + 1] + [0] * (len(settled) - agree - 1)], 0.0, {}

    monkeypatch.setattr(spec, "run_batch1", run_batch1)
    oracle = OracleProposer.__new__(OracleProposer)
    oracle.continuations = {}
    assert spec.record_oracle(None, oracle, [[1, 2]], [[9, 9, 9, 9]], 4) == 5
    assert oracle.continuations[(1, 2)] == settled and runs == [0, 1, 2, 3, 4]
    assert spec.record_oracle(None, oracle, [[1, 2]], [[9, 9, 9, 9]], 4, rounds=2) == 2  # gives up, warns


def test_switching_proposer_drops_graphs_captured_for_the_old_one(tiny_model):
    """The oracle after n-gram: verify graphs captured with the n-gram's device lookup must not draft its steps."""
    from nanovllm import LLM
    from nanovllm.bench.spec import use_proposer
    from nanovllm.config import SpeculativeConfig
    from nanovllm.engine.spec.verify import VerifyGraphs

    config = SpeculativeConfig(method="ngram", num_speculative_tokens=3, max_batch_size=1)
    with LLM(str(tiny_model), device="cpu", max_model_len=64, speculative_config=vars(config)) as llm:
        old = llm.engine.speculator
        old.graphs = VerifyGraphs(llm.engine.runner, old.k, 1, capture_graphs=False, proposer=old.proposer)
        assert old.graphs.propose is not None
        spec = use_proposer(llm.engine, SpeculativeConfig(method="oracle", num_speculative_tokens=3,
                                                          max_batch_size=1))
        assert llm.engine.speculator is spec and type(spec.proposer).__name__ == "OracleProposer"
        assert spec.graphs is None or spec.graphs.propose is None
