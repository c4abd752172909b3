"""The benchmark CLI on the CPU: `all --quick` writes a complete results file, compare gates on
regressions, plot writes a PNG, profile counts ops and writes a Chrome trace."""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys

import pytest

from nanovllm.bench import compare
from nanovllm.bench.__main__ import main as bench_main
from nanovllm.bench.results import REQUIRED, save
from tests.helpers import subprocess_env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nanovllm_cache")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache):
    """One `python -m nanovllm.bench all --quick` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    env = subprocess_env(NANOVLLM_CACHE=str(cache))
    p = subprocess.run([sys.executable, "-m", "nanovllm.bench", "all", "--quick", "--out-dir", str(out)],
                       cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files  # traces are .json.gz
    return files[0], out


def test_all_quick_writes_required_keys(quick_run):
    path, out = quick_run
    r = json.loads(path.read_text())
    assert set(REQUIRED) <= set(r)
    assert path.name.startswith(r["date"][:10]) and "_cpu" in path.name
    assert not r["errors"], r["errors"]
    assert {e["context"] for e in r["latency"]} == {16, 32}
    for e in r["latency"]:
        assert e["preset"] == "auto" and e["decode_tok_s"] > 0 and e["p90_ms"] >= e["median_ms"] > 0
        assert e["model"] == "tiny" and e["quantization"] == "none"  # the RESULTS/baseline row fields
        assert 0 < e["pct_roofline"]
    assert r["throughput"]["output_tok_s"] > 0 and r["throughput"]["generated_tokens"] > 0
    assert r["throughput"]["preemptions"] >= 0 and r["throughput"]["kv_cache_tokens"] > 0
    assert r["roofline_tok_s"] > 0 and r["roofline"]["weight_bytes"] > 0
    assert r["launches_per_token"]["auto"] > 0
    assert set(r["peers"]) == {"hf_eager", "hf_static_compile"}
    for name, rate in r["peers"].items():  # peers fail soft, but on the CPU both should run
        assert rate and rate > 0, r["peer_details"][name]
    ops = {(e["op"], e["backend"]) for e in r["ops"] if "gbps" in e}
    assert {("linear", "eager"), ("attention_decode", "eager"), ("mlp", "eager")} <= ops
    assert r["versions"]["torch"] and r["git_sha"]
    assert (out / "trace_auto.json.gz").is_file() and path.with_suffix(".png").is_file()


def test_compare_gates_regressions(quick_run, tmp_path, capsys):
    path, _ = quick_run
    assert bench_main(["compare", str(path), str(path)]) == 0
    slower = json.loads(path.read_text())
    for e in slower["latency"]:
        e["decode_tok_s"] *= 0.8
    worse = save(slower, tmp_path / "slower.json")
    assert bench_main(["compare", str(path), str(worse)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert bench_main(["compare", str(path), str(worse), "--threshold", "0.25"]) == 0


def test_compare_directions():
    a = {"latency": [], "peers": {"hf_eager": 10.0}, "launches_per_token": {"x": 100.0}, "ops": []}
    b = copy.deepcopy(a)
    b["peers"]["hf_eager"] = 5.0           # a slower peer is reported, not gated
    b["launches_per_token"]["x"] = 130.0   # more launches is a regression
    rows, regressions = compare.compare(a, b, 0.05)
    assert regressions == ["launches/token x"]
    assert any(r[0] == "peer hf_eager tok/s" and r[4] == "worse (not gated)" for r in rows)


def test_plot_writes_png(quick_run, tmp_path):
    path, _ = quick_run
    out = tmp_path / "x.png"
    assert bench_main(["plot", str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_counts_ops_and_writes_trace(quick_run, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(cache))  # the tiny model quick_run wrote
    assert bench_main(["profile", "--quick", "--steps", "2", "--warmup", "1", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "profile_auto.json").read_text())
    assert summary["launches_per_step"] > 0 and summary["unit"].startswith("top-level aten ops")
    assert summary["top"] and sum(summary["us_per_step_by_kind"].values()) > 0
    trace = json.loads(gzip.decompress((tmp_path / "trace_auto.json.gz").read_bytes()))
    assert any(ev.get("name", "").startswith("aten::") for ev in trace["traceEvents"])


def test_profile_summary_counts_cuda_kernels_and_graph_launches():
    """The CUDA branch on synthetic events: kernels counted whether a graph or the host launched them."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from nanovllm.bench.profiling import kind, summarize

    def ev(name, device, start=0.0, dur=1.0):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=start + dur),
                               cpu_parent=None, cpu_time_total=dur)

    kernels = ["nvjet_tst_64x8_64x16_gemv", "BatchDecodeWithPagedKVCacheKernel", "triton_red_fused_add_mean_rsqrt_0",
               "void at::native::reduce_kernel<ArgMaxOps>"]
    events = [ev("cudaGraphLaunch", DeviceType.CPU), ev("cudaLaunchKernel", DeviceType.CPU),
              ev("Memcpy HtoD (Pinned -> Device)", DeviceType.CUDA)]
    events += [ev(k, DeviceType.CUDA, dur=2.0) for k in kernels * 2]  # two steps
    s = summarize(events, steps=2, on_cuda=True)
    assert s["launches_per_step"] == 4 and s["copies_per_step"] == 0.5 and s["graph_kernels_visible"]
    assert s["host_launches_per_step"] == 1.0 and s["graph_launches_per_step"] == 0.5
    assert set(s["us_per_step_by_kind"]) == {"gemm", "attention", "norm", "sampling"}
    assert [kind(k) for k in kernels] == ["gemm", "attention", "norm", "sampling"]
    hidden = summarize(events[:3], steps=1, on_cuda=True)  # a graph launched, no kernel seen
    assert not hidden["graph_kernels_visible"] and "note" in hidden


def test_profile_critical_path_of_overlapping_kernels():
    """PDL overlap: a kernel that starts while the one before runs adds only its part past that one's end; a
    gap before a kernel is nobody's."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from nanovllm.bench.profiling import summarize

    def ev(name, start, end):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end))

    # gemv 0-10, attention 4-13 (adds 3), merge 12-14 (adds 1), a gap with a copy 15-17, gemv again 20-30 (adds 10)
    events = [ev("_gemv_kernel", 0, 10), ev("_decode_split_kernel", 4, 13), ev("_decode_merge_kernel", 12, 14),
              ev("Memcpy DtoD (Device -> Device)", 15, 17), ev("_gemv_kernel", 20, 30)]
    s = summarize(events, steps=1, on_cuda=True)
    crit = {t["name"]: t["critical_us_per_step"] for t in s["top"]}
    assert crit == {"_gemv_kernel": 20.0, "_decode_split_kernel": 3.0, "_decode_merge_kernel": 1.0}
    assert s["critical_us_per_step"] == 24.0 and s["busy_us_per_step"] == 31.0
    # the span (30) less the kernels' critical time (24): the copy (2) and the gaps 14-15 and 17-20 (4)
    assert s["copy_us_per_step"] == 2.0 and s["idle_us_per_step"] == 4.0 and s["copies_per_step"] == 1.0
    # the same kernel at two call sites, told apart by the kernel launched before it (in start order)
    sites = {(t["after"], t["name"]): t["critical_us_per_step"] for t in s["top_by_site"]}
    assert sites == {("", "_gemv_kernel"): 10.0, ("_gemv_kernel", "_decode_split_kernel"): 3.0,
                     ("_decode_split_kernel", "_decode_merge_kernel"): 1.0,
                     ("_decode_merge_kernel", "_gemv_kernel"): 10.0}
    leads = {(t["after"], t["name"]): t["mean_lead_us"] for t in s["top_by_site"]}
    assert leads == {("", "_gemv_kernel"): 0.0, ("_gemv_kernel", "_decode_split_kernel"): 6.0,
                     ("_decode_split_kernel", "_decode_merge_kernel"): 1.0,
                     ("_decode_merge_kernel", "_gemv_kernel"): -6.0}


def test_decode_steps_of_a_batch(tiny_model):
    """Each step decodes one token of every request (the profiler's throughput regime); close() frees all."""
    from nanovllm import LLM
    from nanovllm.bench.steps import DecodeSteps

    llm = LLM(str(tiny_model), max_model_len=256, max_num_seqs=8, num_kvcache_blocks=64)
    with DecodeSteps(llm, context=20, max_steps=5, batch=3) as decode:
        before = {s.request_id: len(s.token_ids) for s in llm.engine.scheduler.running}
        assert len(before) == 3
        decode.step()
        after = {s.request_id: len(s.token_ids) for s in llm.engine.scheduler.running}
        assert all(after[r] == n + 1 for r, n in before.items())
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="max_num_seqs"):
        DecodeSteps(llm, batch=9)


def test_decode_steps_keep_every_request_while_prefill_is_chunked(tiny_model):
    """The first requests decode while later ones still prefill (token budget 32, 3 x 20-token prompts): none
    may run out of tokens before the last step, or a profiled step would have fewer rows than asked."""
    from nanovllm import LLM
    from nanovllm.bench.steps import DecodeSteps

    llm = LLM(str(tiny_model), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32, num_kvcache_blocks=64)
    with DecodeSteps(llm, context=20, max_steps=4, batch=3) as decode:
        for _ in range(4):
            decode.step()
            assert len(llm.engine.scheduler.running) == 3
    assert not llm.engine.has_unfinished()


def test_an_override_hydra_rejects_gets_its_reason_not_a_traceback(capsys):
    assert bench_main(["spec", "--quick", "model=qwen3-8b-random"]) == 2
    err = capsys.readouterr().out
    assert "Could not find 'model/qwen3-8b-random'" in err and "model.name=qwen3-8b-random" in err
    assert "Traceback" not in err and "Config search path" not in err
    assert bench_main(["latency", "--quick", "engine.no_such_field=1"]) == 2
    assert "engine.no_such_field" in capsys.readouterr().out
