"""Every Triton kernel (kernels/triton/) against its native op on CPU, through the Triton interpreter.

Why a subprocess: Triton chooses the interpreter when a kernel is *decorated* (TRITON_INTERPRET=1 at that
moment), and plugin files are imported once per process. In a full pytest run other modules load the
plugins first, so our kernels would be GPU kernels that cannot take CPU tensors. So the one test that runs
in the normal pytest process re-runs this file in a fresh `python -m pytest` with the variable set; the
variable is then set before anything imports a plugin, and the tests below run there. (Running pytest
with TRITON_INTERPRET=1 already set also works: the inner tests then run in-process.)
Sizes are odd and small (N=37, K=71, rows 1 and 3): the interpreter costs per program and per op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

from nanovllm.ops import MODEL_SCOPE, Target, get_op, load_plugins, native_site, resolve
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.sites import AttentionSettings, LayerWeights
from nanovllm.ops.testing import verify_step
from tests.helpers import ROOT, compile_for_hopper, marked_tests, run_under_the_interpreter

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_under_the_interpreter's subprocess")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


# The interpreter run in parts of comparable length, one subprocess each (without the pytest plugins that the
# inner tests do not use: they take seconds to import), so that no test runs for minutes.
INTERPRETER_RUNS = {
    "elementwise": ("test_prefetch_only_when_every_weight_read_early_is_a_parameter",
                    "test_rms_norm_and_add_rms_norm", "test_rms_norm_reads_strided_head_views_in_place",
                    "test_silu_and_mul", "test_sample_race", "test_ngram_lookup", "test_verify_layout",
                    "test_verify_accept", "test_pipelined_verify_steps_through_the_kernels", "test_qk_norm_rope",
                    "test_attention_decode", "test_rope_decode_attention_on_verify_rows",
                    "test_every_triton_backend_resolves_on_the_interpreter"),
    "gemv": ("test_linear", "test_linear_with_weights_read_before_the_wait", "test_norm_qkv", "test_attn_out",
             "test_lm_head_sample"),
    "mlp": ("test_mlp", "test_rope_decode_attention"),
    "layer": ("test_decode_layer", "test_decode_layer_on_verify_rows",
              "test_interleaved_layout_is_applied_once_where_resolved",
              "test_sites_sharing_a_weight_must_agree_on_its_layout"),
    "model": ("test_all_fused_tiny_model_matches_eager",),
}


@pytest.mark.parametrize("run", INTERPRETER_RUNS)
def test_kernels_under_the_interpreter(run):
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    run_under_the_interpreter(__file__, INTERPRETER_RUNS[run], durations=8)


def test_interpreter_runs_hold_every_inner_test_once():
    runs = [name for names in INTERPRETER_RUNS.values() for name in names]
    assert sorted(runs) == sorted(marked_tests(globals(), inner.mark))


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("split", ["whole", "sum kernel", "in-launch", "norm"])
def test_gemv_rows_compile_for_hopper(split, prefetch):
    """The 2-16-row (tl.dot) GEMV compiles to sm_90 machine code with and without its weight prefetch before the
    PDL wait, K whole, split for the sum kernel (uneven K) or reduced in the launch, and with the norm inside."""
    if INTERPRETED:
        pytest.skip("interpreted kernels do not compile")
    load_plugins()
    kernel = sys.modules["nanovllm_plugins.triton._gemv_core"]._gemv_kernel
    const = dict(HAS_BIAS=True, HAS_RES=True, HAS_NORM=split == "norm", PARTIAL=split == "sum kernel",
                 SERIAL=split == "in-launch", SPLIT_K=1 if split in ("whole", "norm") else 2,
                 EVEN_K=split != "sum kernel", ONE_TILE=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, DOT_F32=False,
                 PDL=True, PREFETCH=prefetch)
    pointers = dict(y_ptr="*fp32" if const["PARTIAL"] else "*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
    assert compile_for_hopper(kernel, const, pointers).asm["cubin"]


def test_shipped_tables_hold_valid_configs():
    """A typo in a shipped table would show only on the GPU it names: every entry is a Config of power-of-2
    blocks and warps, a one-row entry's programs each take their K range as one tile (the prefetching path),
    and a hand-picked entry (an end-to-end choice, no tuner timing) says why."""
    import json
    import re

    from nanovllm.ops.plugins import load_sibling
    tuned = ROOT / "kernels" / "triton" / "tuned"
    Config = load_sibling(str(tuned.with_name("_tuning.py")), "_tuning").Config
    tables = sorted(tuned.glob("*.json"))
    assert tables
    for path in tables:
        for key, entry in json.loads(path.read_text()).items():
            _, k, m = map(int, re.fullmatch(r"\w+:\w+:N(\d+):K(\d+):M(\d+)", key).groups())
            cfg = Config.of(entry)
            assert all(v & (v - 1) == 0 for v in (cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps)), (path.name, key)
            assert cfg.SPLIT_K >= 1 and cfg.num_stages >= 1, (path.name, key)
            assert m > 1 or cfg.SPLIT_K * cfg.BLOCK_K >= k, (path.name, key)
            assert entry.get("us") is not None or entry.get("chosen"), (path.name, key)


def test_kernels_do_not_import_the_bench():
    """The shipped kernels depend on the engine's packages only, never on the benchmark harness."""
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "kernels").rglob("*.py")
                 if "nanovllm.bench" in path.read_text()]
    assert not offenders


def test_kernel_sources_hold_no_backslash():
    """torch.compile pastes a Triton kernel's source (its jit helpers' and its constexpr globals' too) into a
    generated module, inside a string literal that torch 2.11 does not escape: a backslash escape there (an
    inline asm's newline) breaks that module, a failure only a GPU run would show. No kernel may hold one."""
    if INTERPRETED:
        pytest.skip("the interpreter's kernels are not what torch.compile pastes")
    from torch._inductor.codegen import wrapper

    closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if closure is None:
        pytest.skip("this torch has no user_defined_triton_kernel_transitive_closure_source_code")
    load_plugins()
    kernels = {f"{mod_name}.{name}": obj for mod_name, mod in list(sys.modules.items())
               if mod_name.startswith("nanovllm_plugins.triton") for name, obj in vars(mod).items()
               if name.endswith("_kernel") and hasattr(obj, "fn")}
    assert len(kernels) > 12, sorted(kernels)
    assert not [name for name, kernel in kernels.items() if "\\" in closure(kernel)]


# -- reference helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def core():
    load_plugins()
    mod = sys.modules["nanovllm_plugins.triton._gemv_core"]
    assert type(mod._gemv_kernel).__name__ == "InterpretedFunction", "kernels were not built for the interpreter"
    return mod


def triton_impl(op: str):
    return get_op(op).impls["triton"].fn


def weight(*shape, dtype):
    return (torch.randn(*shape) * 0.2).to(dtype)


def config(core, cfg):
    """`cfg` = (BLOCK_N, BLOCK_K, SPLIT_K) forced for every launch, or None for the interpreter default."""
    return core.tuning.forced(core.tuning.Config(*cfg)) if cfg else contextlib.nullcontext()


def paged_meta(kv_lens, block_size=4, num_blocks=40, seed=0):
    """Decode metadata: one query per request, at the last of its kv_lens positions, scattered pages."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-kl // block_size))] for kl in kv_lens]
    return build_metadata(tables, kv_lens, block_size).to_device("cpu")


# -- primitives and sites ------------------------------------------------------------------------------------
@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (16, 32, 2)), (1, (16, 128, 1)), (1, (8, 64, 2)), (3, None),
                                      (3, (16, 32, 3)), (1, (16, 32, 2, 4, 1, True)), (3, (16, 32, 3, 4, 1, True)),
                                      (20, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(core, dtype, rows, cfg, bias):
    """Rows 1: FMA path, K in several tiles or in one (whole, or per split: 64 + 7 columns); 3: tl.dot path;
    split-K 2 and 3 (uneven K ranges); 20 rows: F.linear."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 71, dtype=dtype), weight(37, 71, dtype=dtype)
    b = torch.randn(37, dtype=dtype) if bias else None
    with config(core, cfg):
        got = triton_impl("linear")(x, w, b)
    torch.testing.assert_close(got, get_op("linear").native(x, w, b), **TOL[dtype])


@inner
@pytest.mark.parametrize("rows,cfg", [(1, (16, 32, 2)), (1, (16, 128, 1)), (3, (16, 32, 1)), (3, (16, 32, 3)),
                                      (3, (16, 32, 3, 4, 1, True))])
def test_linear_with_weights_read_before_the_wait(core, rows, cfg, monkeypatch):
    """The prefetching path (Parameters under PDL on sm90+, so never taken by the interpreter by itself): the
    first weight tile loaded ahead, then one tile ahead of the dot; K in several tiles, uneven splits."""
    monkeypatch.setattr(core, "prefetch", lambda use_pdl, *weights: True)
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 71), weight(37, 71, dtype=torch.float32)
    with config(core, cfg):
        got = triton_impl("linear")(x, w, None)
    torch.testing.assert_close(got, get_op("linear").native(x, w, None), **TOL[torch.float32])


@inner
def test_prefetch_only_when_every_weight_read_early_is_a_parameter(core):
    """A GEMV reads its weight tile and norm weights before the PDL wait only if no kernel in flight can write
    them: Parameters. A plain tensor may be the output of the kernel it overlaps with."""
    param, plain = torch.nn.Parameter(torch.ones(4), requires_grad=False), torch.ones(4)
    assert core.prefetch(True, param, param) and core.prefetch(True, param, None)
    assert not core.prefetch(True, param, plain) and not core.prefetch(True, plain, param)
    assert not core.prefetch(False, param, param)


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 37), (5, 37), (2, 3, 37)])
def test_rms_norm_and_add_rms_norm(core, dtype, shape):
    """The many-rows fallbacks' norms: odd widths, 1-3 leading dims, a weight that is not all ones."""
    torch.manual_seed(len(shape))
    x, r, w = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype), weight(shape[-1], dtype=dtype) + 1
    torch.testing.assert_close(triton_impl("rms_norm")(x, w, 1e-6), get_op("rms_norm").native(x, w, 1e-6),
                               **TOL[dtype])
    got, want = triton_impl("add_rms_norm")(x, r, w, 1e-6), get_op("add_rms_norm").native(x, r, w, 1e-6)
    torch.testing.assert_close(got[1], want[1], **TOL[dtype])  # exact on the GPU; the interpreter truncates bf16
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])


@inner
def test_rms_norm_reads_strided_head_views_in_place(core):
    """q/k norms get (tokens, heads, head_dim) views of the packed QKV output: strided rows, no copy."""
    torch.manual_seed(0)
    qkv, w = torch.randn(3, 7 * 12), weight(12, dtype=torch.float32) + 1
    q = qkv[:, :4 * 12].view(3, 4, 12)
    k = qkv[:, 4 * 12:6 * 12].view(3, 2, 12)
    for view in (q, k, qkv[:, 1:3 * 12 + 1].view(3, 3, 12)):
        torch.testing.assert_close(triton_impl("rms_norm")(view, w, 1e-6), get_op("rms_norm").native(view, w, 1e-6),
                                   **TOL[torch.float32])


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 29), (4, 2 * 29), (2, 3, 2 * 1030)])
def test_silu_and_mul(core, dtype, shape):
    """Odd widths; 1030 columns span two column blocks of the kernel."""
    torch.manual_seed(shape[-1])
    x = torch.randn(*shape, dtype=dtype) * 3
    torch.testing.assert_close(triton_impl("silu_and_mul")(x), get_op("silu_and_mul").native(x), **TOL[dtype])


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (4, 128, 1)), (3, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_qkv(core, dtype, rows, cfg, bias):
    """One row: the norm over K in two tiles (the interpreter's default) or in one."""
    torch.manual_seed(rows)
    args = (torch.randn(rows, 71, dtype=dtype), weight(71, dtype=dtype) + 1, weight(37, 71, dtype=dtype),
            torch.randn(37, dtype=dtype) if bias else None, 1e-6)
    with config(core, cfg):
        got = triton_impl("norm_qkv")(*args)
    torch.testing.assert_close(got, native_site("norm_qkv")(*args), **TOL[dtype])


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (8, 16, 1)), (1, (1, 16, 1)), (1, (4, 64, 1)), (3, (16, 16, 1)),
                                      (20, None)])
@pytest.mark.parametrize("residual", [False, True])
def test_mlp(core, dtype, rows, cfg, residual):
    """The Triton site reads gate/up rows interleaved (its weight layout, applied at load); the native reads
    [gate; up]. 20 rows: the prefill path (cuBLAS on the interleaved weight, un-interleaved output)."""
    torch.manual_seed(rows)
    args = (torch.randn(rows, 37, dtype=dtype), weight(2 * 29, 37, dtype=dtype), weight(37, 29, dtype=dtype),
            torch.randn(rows, 37, dtype=dtype) if residual else None)
    interleave = get_op("mlp").impls["triton"].layouts["gate_up_w"]
    with config(core, cfg):
        got = triton_impl("mlp")(args[0], interleave(args[1]), *args[2:])
    torch.testing.assert_close(got, native_site("mlp")(*args), **TOL[dtype])


@inner
def test_interleaved_layout_is_applied_once_where_resolved(core, make_checkpoint):
    """Only layers whose mlp resolved to the Triton site get interleaved gate/up rows, and a model mixing
    both layouts matches the eager model (prefill through the fallback, decode through the kernel)."""
    from nanovllm import LLM
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    path = make_checkpoint(seed=5, vocab_size=256)
    common = dict(device="cpu", dtype="float32", max_model_len=64, num_kvcache_blocks=16, kvcache_block_size=4,
                  max_num_seqs=2)
    mixed = {"layers": {"1": {"mlp": "triton"}}}
    with LLM(str(path), **common) as ref, LLM(str(path), kernels=mixed, **common) as fused:
        a, b = ref.engine.runner.model.layers, fused.engine.runner.model.layers
        assert torch.equal(a[0].gate_up_proj, b[0].gate_up_proj)
        inter = a[1].gate_up_proj.shape[0] // 2
        assert torch.equal(b[1].gate_up_proj[0::2], a[1].gate_up_proj[:inter])
        assert torch.equal(b[1].gate_up_proj[1::2], a[1].gate_up_proj[inter:])
        # decode_layer's LayerWeights bundle holds the Parameters themselves: it reads the interleaved rows too
        assert all(w is getattr(b[1], name) for w, name in zip(b[1].decode_weights, (
            "input_norm", "qkv_proj", "qkv_bias", "q_norm", "k_norm", "o_proj", "post_norm", "gate_up_proj",
            "down_proj")))
        prompt = list(range(3, 24))  # 21 rows: more than a GEMV takes
        torch.testing.assert_close(teacher_forced_logits(fused.engine, prompt, [7, 9]),
                                   teacher_forced_logits(ref.engine, prompt, [7, 9]), atol=1e-4, rtol=1e-4)


@inner
def test_sites_sharing_a_weight_must_agree_on_its_layout(core, make_checkpoint):
    """decode_layer's Triton chain reads gate/up interleaved; with the eager mlp (as loaded) in the same layer
    the model refuses to build and names both, rather than one of them reading the wrong layout."""
    from nanovllm import LLM
    from nanovllm.ops import RegistryError

    path = make_checkpoint(seed=5, vocab_size=256)
    common = dict(device="cpu", dtype="float32", max_model_len=64, num_kvcache_blocks=16, kvcache_block_size=4)
    with pytest.raises(RegistryError, match=r"gate_up_proj is read in different layouts by mlp \(eager\) and "
                                            r"decode_layer \(triton_chain\)"):
        LLM(str(path), kernels={"ops": {"decode_layer": "triton_chain"}}, **common)
    with LLM(str(path), kernels={"ops": {"decode_layer": "triton_chain", "mlp": "triton"}}, **common) as llm:
        assert llm.engine.runner.resolver.table["0"]["decode_layer"] == "triton_chain"


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (16, 32, 2)), (1, (8, 128, 1)), (3, (16, 16, 3)),
                                      (5, (16, 16, 1))])
def test_attn_out(core, dtype, rows, cfg):
    torch.manual_seed(rows)
    args = (torch.randn(rows, 71, dtype=dtype), weight(37, 71, dtype=dtype), torch.randn(rows, 37, dtype=dtype),
            weight(37, dtype=dtype) + 1, 1e-6)
    with config(core, cfg):
        normed, res = triton_impl("attn_out")(*args)
    want_normed, want_res = native_site("attn_out")(*args)
    torch.testing.assert_close(res, want_res, **TOL[dtype])
    torch.testing.assert_close(normed, want_normed, **TOL[dtype])


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [37, 301])
def test_sample_race(core, dtype, vocab):
    """Temperature sampling from the same noise picks the native's tokens: greedy (T = 0) and sampled rows
    mixed, a vocabulary in several chunks (blocks of 32, two per chunk) with a ragged last one; filtered
    steps take the native op."""
    torch.manual_seed(vocab)
    rows = 5
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    temperature = torch.tensor([0.0, 0.6, 1.0, 0.0, 2.5])
    noise = torch.empty(rows, vocab).exponential_()
    native = get_op("sample").native
    want = native(logits, temperature, None, None, None, noise)
    got = torch.ops.nanovllm_triton.sample_race(logits, temperature, noise, 32, 2)
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
    assert triton_impl("sample")(logits, temperature, None, None, None, noise).tolist() == want.tolist()
    top_k = torch.tensor([0, 3, 0, 2, 5])
    filtered = triton_impl("sample")(logits, temperature, top_k, None, None, noise)
    assert filtered.tolist() == native(logits, temperature, top_k, None, None, noise).tolist()
    assert triton_impl("sample")(logits, temperature, None, None, None, None).tolist() == logits.argmax(-1).tolist()


@inner
@pytest.mark.parametrize("n_min,n_max", [(1, 3), (2, 4)])
def test_ngram_lookup(core, n_min, n_max):
    """The prompt lookup of each row: rows of every length over several blocks of 8 end positions, a small
    alphabet (n-grams repeat), caps below 0 and above k."""
    torch.manual_seed(n_max)
    k, width = 4, 29
    history = torch.randint(0, 3, (7, width))
    lengths = torch.tensor([0, 1, 2, 9, 17, 28, 29])
    caps = torch.tensor([4, 4, -1, 2, 4, 9, 4])
    want = get_op("ngram_lookup").native(history, lengths, caps, k, n_min, n_max)
    got = torch.ops.nanovllm_triton.ngram_lookup(history, lengths, caps, k, n_min, n_max, 8)
    assert got[:, :k].tolist() == want[0].tolist() and got[:, k].tolist() == want[1].tolist()
    assert want[1].sum() > 0
    drafts, counts = triton_impl("ngram_lookup")(history, lengths, caps, k, n_min, n_max)
    assert drafts.tolist() == want[0].tolist() and counts.tolist() == want[1].tolist()


def verify_state(b: int = 5, k: int = 3, blocks: int = 6, block_size: int = 4, seed: int = 0) -> dict:
    """A verify step's buffers: b sequences of k + 1 rows, some chained, drafts proposed on the device."""
    g = torch.Generator().manual_seed(seed)
    k1 = k + 1
    r = lambda hi, *shape: torch.randint(0, hi, shape, generator=g)  # noqa: E731
    tables = r(40, b, blocks).repeat_interleave(k1, dim=0)  # each row over its sequence's blocks
    start = k1 + r(blocks * block_size - 3 * k1, b)  # room for k + 1 rows after a shift of -(k + 1) to k + 1
    positions = (start[:, None] + torch.arange(k1)).reshape(-1)
    return dict(ids=r(50, b, k1), positions=positions, seq_lens=positions + 1, slot_mapping=torch.zeros(b * k1,
                dtype=torch.int64), num_drafts=r(k1, b), chained=torch.tensor([1, 0, 1, 1, 0][:b]),
                assumed=r(k1, b), block_tables=tables, last=torch.cat((r(k1, 2, b), r(50, 1 + k, b))),
                proposed=r(50, b, k), proposed_counts=r(k1, b), block_size=block_size)


@inner
@pytest.mark.parametrize("proposed", [False, True])
def test_verify_layout(core, proposed):
    """Chained rows moved by the drafts kept less those assumed (up or down), every row's slot recomputed, a
    chained sequence's inputs from the step before (and the device proposer); other sequences untouched."""
    want, got = verify_state(), verify_state()
    for state in (want, got):
        if not proposed:
            state["proposed"] = state["proposed_counts"] = None
        state["assumed"] = torch.where(torch.arange(5) % 2 == 0, state["assumed"], state["last"][0] + 1)
    get_op("verify_layout").native(*want.values())
    triton_impl("verify_layout")(*got.values())
    for name in ("ids", "positions", "seq_lens", "slot_mapping", "num_drafts"):
        assert got[name].tolist() == want[name].tolist(), name


@inner
@pytest.mark.parametrize("history", [False, True])
def test_verify_accept(core, history):
    """Drafts kept while each equals the target before it (none, some, all), the token after them, the result
    columns, lengths and caps, and the kept tokens appended to each sequence's history."""
    state = verify_state()
    b, k1 = state["ids"].shape
    targets = state["ids"].roll(-1, dims=1).clone()  # every draft right ...
    targets[1, 0] += 1  # ... but sequence 1's first
    targets[3, 2] += 1  # ... and sequence 3's third
    num_drafts = torch.tensor([3, 3, 0, 3, 2])
    limit = torch.full((b,), 40)
    hist = [torch.randint(0, 50, (b, 40)) if history else None for _ in range(2)]
    if history:
        hist[1].copy_(hist[0])
    want = get_op("verify_accept").native(targets, state["ids"], num_drafts, state["positions"], limit, hist[0])
    got = triton_impl("verify_accept")(targets, state["ids"], num_drafts, state["positions"], limit, hist[1])
    assert [t.tolist() for t in got] == [t.tolist() for t in want]
    assert want[0][0].tolist() == [3, 0, 0, 2, 2]
    if history:
        assert torch.equal(hist[1], hist[0])


@inner
def test_pipelined_verify_steps_through_the_kernels(core, make_checkpoint):
    """n-gram speculation whose verify steps (replayed eagerly, chained, drafted on the device) run the
    bookkeeping kernels: greedy output is that of plain decoding, and drafts were kept."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.spec.verify import VerifyGraphs

    path = make_checkpoint(seed=3, vocab_size=512)
    common = dict(device="cpu", dtype="float32", max_model_len=96, num_kvcache_blocks=24, kvcache_block_size=4,
                  max_num_seqs=2)
    kernels = {"ops": dict.fromkeys(("verify_layout", "verify_accept", "ngram_lookup"), "triton")}
    spec = {"method": "ngram", "num_speculative_tokens": 3, "max_batch_size": 2, "prompt_lookup_min": 1}
    prompts = [[5, 77, 301, 12, 9, 5, 77, 301] * 3, [40, 41, 42, 43] * 5]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(path), **common) as ref, LLM(str(path), kernels=kernels, speculative_config=spec, **common) as llm:
        assert set(llm.engine.runner.resolver.table[MODEL_SCOPE][op] for op in kernels["ops"]) == {"triton"}
        s = llm.engine.speculator
        s.graphs = VerifyGraphs(llm.engine.runner, s.k, 2, capture_graphs=False, proposer=s.proposer)
        on_device, launch = [], s.graphs.launch
        s.graphs.launch = lambda seqs, drafts, assumed=None: (on_device.append(drafts is None)
                                                              or launch(seqs, drafts, assumed))
        assert llm.generate(prompts, greedy) == ref.generate(prompts, greedy)
        assert s.totals.num_accepted_tokens > 0 and sum(on_device) > 2


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("sampled", [False, True])
def test_lm_head_sample(core, dtype, rows, sampled):
    torch.manual_seed(rows)
    vocab = 301
    h, norm_w, lm_w = torch.randn(rows, 37, dtype=dtype), weight(37, dtype=dtype) + 1, weight(vocab, 37, dtype=dtype)
    temperature = torch.rand(rows) + 0.5 if sampled else torch.zeros(rows)
    temperature[0] = 0.0  # a greedy row inside a sampled step keeps its argmax
    noise = torch.empty(rows, vocab).exponential_() if sampled else None
    sampling = (temperature, torch.full((rows,), -1), torch.ones(rows), torch.zeros(rows), noise)
    got = triton_impl("lm_head_sample")(h, norm_w, 1e-6, lm_w, *sampling)
    want = native_site("lm_head_sample")(h, norm_w, 1e-6, lm_w, *sampling)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    logits = get_op("linear").native(get_op("rms_norm").native(h, norm_w, 1e-6), lm_w).float()
    gap = logits.max(-1).values - logits.gather(1, got[:, None])[:, 0]  # 0 unless rounding splits a near tie
    assert (got == want).all() or (gap[temperature == 0] <= 2 * TOL[dtype]["atol"]).all(), (got, want, gap)


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("head_dim,qk_norm", [(12, True), (16, False)])
def test_qk_norm_rope(core, dtype, tokens, head_dim, qk_norm):
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(tokens)
    hq, hk = 4, 2
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, dtype=dtype)  # q, k, v are strided views, as in the model
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split((hq * head_dim, hk * head_dim, hk * head_dim), -1))
    norms = (weight(head_dim, dtype=dtype) + 1, weight(head_dim, dtype=dtype) + 1) if qk_norm else (None, None)
    pos, slots = torch.randint(0, 50, (tokens,)), torch.randperm(8 * 4)[:tokens]
    table = cos_sin_table(Rope(), head_dim, 64)
    caches = [torch.zeros(8, 4, hk, head_dim, dtype=dtype) for _ in range(4)]
    got = triton_impl("qk_norm_rope")(q, k, v, *norms, 1e-6, pos, table, caches[0], caches[1], slots)
    want = native_site("qk_norm_rope")(q, k, v, *norms, 1e-6, pos, table, caches[2], caches[3], slots)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[2], **TOL[dtype])
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)


@inner
@pytest.mark.parametrize("dtype,window,softcap,splits", [
    (torch.float32, 0, 0.0, 0), (torch.float32, 0, 0.0, 3), (torch.float32, 6, 0.0, 3), (torch.float32, 0, 5.0, 2),
    (torch.bfloat16, 0, 0.0, 0), (torch.bfloat16, 6, 5.0, 2)])
def test_attention_decode(core, dtype, window, softcap, splits):
    torch.manual_seed(splits)
    meta = paged_meta([1, 17, 70])
    kc, vc = torch.randn(40, 4, 2, 12, dtype=dtype), torch.randn(40, 4, 2, 12, dtype=dtype)
    q = torch.randn(3, 6, 12, dtype=dtype)  # GQA groups of 3, head_dim 12 (padded to 16 inside)
    if splits:  # the op with a forced split count (the registered impl picks it from the shapes)
        got = torch.ops.nanovllm_triton.decode_attention(q, kc, vc, meta.block_tables, meta.positions, 0.3, window,
                                                         softcap, splits)
    else:
        got = triton_impl("attention_decode")(q, kc, vc, meta, 0.3, window, softcap)
    want = get_op("attention_decode").native(q, kc, vc, meta, 0.3, window, softcap)
    torch.testing.assert_close(got, want, **TOL[dtype])


@inner
@pytest.mark.parametrize("dtype,window", [(torch.float32, 0), (torch.bfloat16, 6)])
def test_rope_decode_attention_on_verify_rows(core, dtype, window):
    """A verify step, 1, 5 and 3 rows at the end of 4, 17 and 70 keys, each row a request over its sequence's
    blocks: the site writes every row's K/V before any row attends (a row sees the drafts before it), as the
    native does (qk_norm_rope, then attention_decode). Output and both caches."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(7)
    meta, num_blocks = verify_step([1, 5, 3], [4, 17, 70], seed=3)
    hq, hk, d = 6, 2, 12
    q, k, v = (t.view(9, -1, d) for t in torch.randn(9, (hq + 2 * hk) * d, dtype=dtype).split(
        (hq * d, hk * d, hk * d), -1))
    norms = (weight(d, dtype=dtype) + 1, weight(d, dtype=dtype) + 1)
    kc, vc = (torch.randn(num_blocks + 1, 4, hk, d, dtype=dtype) for _ in range(2))
    args = (q, k, v, *norms, 1e-6, meta.positions, cos_sin_table(Rope(), d, 128))
    got_caches, want_caches = (kc.clone(), vc.clone()), (kc, vc)
    got = triton_impl("rope_decode_attention")(*args, *got_caches, meta, 0.3, window, 0.0)
    want = native_site("rope_decode_attention")(*args, *want_caches, meta, 0.3, window, 0.0)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_caches[0], want_caches[0], **TOL[dtype])
    torch.testing.assert_close(got_caches[1], want_caches[1], atol=0, rtol=0)


def rope_attention_case(dtype, qk_norm: bool, seed: int):
    """A rope_decode_attention step of 3 requests (1, 17 and 70 keys): (meta, the site's arguments up to the
    caches, [k cache, v cache, their copies]). Raw q, k, v are strided views of a packed QKV."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(seed)
    meta = paged_meta([1, 17, 70])
    hq, hk, d = 6, 2, 12
    qkv = torch.randn(3, (hq + 2 * hk) * d, dtype=dtype)
    q, k, v = (t.view(3, -1, d) for t in qkv.split((hq * d, hk * d, hk * d), -1))
    norms = (weight(d, dtype=dtype) + 1, weight(d, dtype=dtype) + 1) if qk_norm else (None, None)
    kc, vc = torch.randn(40, 4, hk, d, dtype=dtype), torch.randn(40, 4, hk, d, dtype=dtype)
    return meta, (q, k, v, *norms, 1e-6, meta.positions, cos_sin_table(Rope(), d, 128)), [kc.clone(), vc.clone(),
                                                                                         kc, vc]


@inner
@pytest.mark.parametrize("dtype,qk_norm,window,splits", [
    (torch.float32, True, 0, 0), (torch.float32, True, 0, 3), (torch.float32, False, 6, 5), (torch.float32, True, 0, 1),
    (torch.bfloat16, True, 0, 3), (torch.bfloat16, False, 0, 0)])
def test_rope_decode_attention(core, dtype, qk_norm, window, splits):
    """q/k norm + RoPE + the KV write fused into decode attention, against qk_norm_rope then attention_decode
    (natives): the output, and both caches after the step. Raw q, k, v are strided views of a packed QKV;
    the split holding each request's newest key (the first, a middle or the last; one split over 70 keys: in
    its second key block) writes it."""
    meta, args, caches = rope_attention_case(dtype, qk_norm, seed=splits)
    if splits:
        got = torch.ops.nanovllm_triton.rope_decode_attention(*args, caches[0], caches[1], meta.slot_mapping,
                                                              meta.block_tables, 0.3, window, 0.0, splits)
    else:
        got = triton_impl("rope_decode_attention")(*args, caches[0], caches[1], meta, 0.3, window, 0.0)
    want = native_site("rope_decode_attention")(*args, caches[2], caches[3], meta, 0.3, window, 0.0)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[2], **TOL[dtype])
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)


LAYER_CASES = [(torch.float32, [70], True, False, 0), (torch.float32, [150], True, True, 0),
               (torch.float32, [150], False, False, 9), (torch.bfloat16, [150], True, False, 0),
               (torch.bfloat16, [5], False, True, 0)]


@inner
@pytest.mark.parametrize("dtype,kv_lens,qk_norm,bias,window",
                         [*LAYER_CASES, (torch.float32, [70, 5, 33], True, False, 0)])
def test_decode_layer(core, dtype, kv_lens, qk_norm, bias, window, backend="triton_chain", q_lens=None):
    """The five-launch chain (or `backend`) against the native composition of the layer's sites: the new
    residual stream and both caches. hidden 48, 4 query heads over 2 kv heads of 12 dims, intermediate 37 (odd:
    ragged last GEMV blocks); 70 keys in a 72-key table run one split (no merge), 150 keys two splits (the
    merge), 9 a sliding window; three requests run the chain's tl.dot GEMVs. q_lens: a verify step of that
    many rows per request (ops.testing.verify_step)."""
    from nanovllm.layers.rotary import cos_sin_table

    class Rope:
        rope_theta = 10000.0

    torch.manual_seed(sum(kv_lens) + qk_norm)
    hidden, hq, hk, d, inter = 48, 4, 2, 12, 37
    meta = paged_meta(kv_lens, num_blocks=60) if q_lens is None else verify_step(q_lens, kv_lens)[0]
    norms = (weight(d, dtype=dtype) + 1, weight(d, dtype=dtype) + 1) if qk_norm else (None, None)
    qkv_w = weight((hq + 2 * hk) * d, hidden, dtype=dtype)
    gate_up, down = weight(2 * inter, hidden, dtype=dtype), weight(hidden, inter, dtype=dtype)
    x = torch.randn(meta.positions.shape[0], hidden, dtype=dtype)
    qkv_b = weight(qkv_w.shape[0], dtype=dtype) if bias else None
    weights = LayerWeights(weight(hidden, dtype=dtype) + 1, qkv_w, qkv_b, *norms, weight(hidden, hq * d, dtype=dtype),
                           weight(hidden, dtype=dtype) + 1, gate_up, down)
    settings, rest = AttentionSettings(1e-6, 0.3, window), (meta.positions, cos_sin_table(Rope(), d, 256))
    kc, vc = torch.randn(60, 4, hk, d, dtype=dtype), torch.randn(60, 4, hk, d, dtype=dtype)
    caches = [kc.clone(), vc.clone(), kc, vc]
    layer = get_op("decode_layer").impls[backend]
    laid_out = weights._replace(gate_up_w=layer.layouts["gate_up_w"](gate_up))
    got = layer.fn(x, laid_out, settings, *rest, caches[0], caches[1], meta)
    want = native_site("decode_layer")(x, weights, settings, *rest, caches[2], caches[3], meta)
    # bf16: the interpreter rounds float32 to bfloat16 toward zero (the GPU to nearest), and a layer compounds it
    torch.testing.assert_close(got, want, **(TOL[dtype] if dtype == torch.float32 else dict(atol=0.3, rtol=0.06)))
    for got_cache, want_cache in zip(caches[:2], caches[2:]):  # v too: our GEMV sums in another order
        torch.testing.assert_close(got_cache, want_cache, **TOL[dtype])


@inner
def test_decode_layer_on_verify_rows(core):
    """A verify step through the chain: 3, 1 and 2 rows per request, each row seeing the K/V of the rows
    before it (written in a launch of their own first)."""
    test_decode_layer(core, torch.float32, [70, 5, 33], True, False, 0, q_lens=[3, 1, 2])


# -- wiring: registry, presets, a whole model --------------------------------------------------------------
@inner
def test_every_triton_backend_resolves_on_the_interpreter(core):
    ops = ("linear", "norm_qkv", "qk_norm_rope", "attn_out", "mlp", "lm_head_sample", "attention_decode",
           "rope_decode_attention", "rms_norm", "add_rms_norm", "silu_and_mul", "sample",
           "decode_layer")
    for op in ops:
        parts = {p: get_op(p).native for p in get_op(op).parts}
        backend = "triton_chain" if op == "decode_layer" else "triton"
        _, used = resolve(op, backend, Target("cpu", torch.float32, dict(hidden=64, head_dim=16, heads=4, kv_heads=2)),
                          allow_fallback=False, parts=parts)
        assert used == backend
    import yaml

    preset = yaml.safe_load((ROOT / "configs/kernels/all_fused.yaml").read_text())["ops"]
    assert preset.pop("decode_layer") == "triton_chain"
    assert set(preset) == set(ops) - {"decode_layer"} and set(preset.values()) == {"triton"}


def preset(path: Path) -> dict:
    """A preset file's kernel table (plugin_dirs relative to the repository root, where presets are run)."""
    import yaml

    table = yaml.safe_load(path.read_text())
    table["plugin_dirs"] = [str(ROOT / d) for d in table.get("plugin_dirs", ())]
    return table


@inner
@pytest.mark.parametrize("over_all_fused", [{}, {"decode_layer": "eager"}], ids=["chain", "sites_in_a_row"])
def test_all_fused_tiny_model_matches_eager(core, make_checkpoint, over_all_fused):
    """all_fused (and with each layer's decode step as its sites in a row, not the chain) against eager."""
    kernels = preset(ROOT / "configs/kernels/all_fused.yaml")
    kernels["ops"].update(over_all_fused)
    check_tiny_model_matches_eager(make_checkpoint, kernels)


def check_tiny_model_matches_eager(make_checkpoint, kernels: dict):
    """Teacher-forced logits through the engine (a prefill of 20 rows runs the sites' parts: the Triton norms and
    SiLU * up around cuBLAS; decode the FMA path), then greedy tokens through lm_head_sample; float32, so the
    fused model must agree to rounding."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    path = make_checkpoint(seed=3, vocab_size=512)  # a small vocab keeps the interpreted LM head cheap
    common = dict(device="cpu", dtype="float32", max_model_len=64, num_kvcache_blocks=16, kvcache_block_size=4,
                  max_num_seqs=2)
    prompt, forced = [5, 77, 301, 12, 9] + list(range(100, 115)), [44, 410]  # 20 rows: the many-rows parts
    with LLM(str(path), **common) as ref, LLM(str(path), kernels=kernels, **common) as fused:
        table = fused.engine.runner.resolver.table
        sites = ("norm_qkv", "mlp", "attn_out", "attention_decode", "rms_norm", "add_rms_norm", "decode_layer")
        assert all(table[s][op] == kernels["ops"].get(op, "eager") for s in ("0", "1") for op in sites)
        want = teacher_forced_logits(ref.engine, prompt, forced)
        got = teacher_forced_logits(fused.engine, prompt, forced)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        assert fused.generate([prompt], greedy)[0]["token_ids"] == ref.generate([prompt], greedy)[0]["token_ids"]
