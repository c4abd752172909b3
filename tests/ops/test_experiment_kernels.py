"""The experimental kernel variants (experiments/kernels/, loaded through kernels.plugin_dirs) and their presets
(experiments/configs/kernels/, found through hydra.searchpath): each kernel against its native op on CPU
through the Triton interpreter, and a tiny model under each preset against the eager model.

The interpreter tests run in a fresh `python -m pytest` with TRITON_INTERPRET=1, as in test_triton_kernels.py
(whose helpers they share): Triton picks the interpreter when a kernel is decorated.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nanovllm.ops import get_op, load_plugins, native_site

pytest.importorskip("triton")

from tests.helpers import ROOT
from tests.ops.test_triton_kernels import (  # noqa: E402  (the helpers need triton)
    DTYPES,
    LAYER_CASES,
    TOL,
    check_tiny_model_matches_eager,
    config,
    core,  # noqa: F401  (a fixture)
    paged_meta,
    preset,
    rope_attention_case,
    weight,
)
from tests.ops.test_triton_kernels import test_decode_layer as check_decode_layer  # noqa: E402  (not collected here)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in test_experiments_under_the_interpreter's subprocess")

EXPERIMENTS = ROOT / "experiments"
PRESETS = ("onepass", "persistent_layer", "triton_embedding")


@pytest.mark.slow  # the experiments' kernels are not shipped; the CPU suite's budget goes to the shipped ones
def test_experiments_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    assert proc.returncode == 0, "interpreter run failed:\n" + proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def experiments(core):  # noqa: F811  (the imported fixture)
    load_plugins([EXPERIMENTS / "kernels"])
    return sys.modules["nanovllm_plugins.kernels._arrival"]


# -- plugin loading and presets (no interpreter needed) ------------------------------------------------------
def test_load_builtin_shares_the_builtin_modules():
    """A plugin outside kernels/ gets the very helper modules the built-in plugins use (one tuning table, one
    set of torch ops), and the built-in plugin modules themselves."""
    from nanovllm.ops.plugins import BUILTIN_DIR, load_builtin, load_sibling

    assert load_builtin("triton/_gemv_core") is load_sibling(str(BUILTIN_DIR / "triton" / "linear.py"), "_gemv_core")
    assert hasattr(load_builtin("triton/attn_out"), "add_rms_norm_row")
    with pytest.raises(FileNotFoundError, match="no built-in kernel file 'triton/_nope'"):
        load_builtin("triton/_nope")


def test_experiment_presets_compose_through_the_searchpath():
    """`hydra.searchpath=[file://experiments/configs]` (relative to the working directory, the repository root)
    finds the presets, which name their plugin directory."""
    from hydra import compose, initialize_config_dir

    from nanovllm.config import check_kernel_names, register_configs

    register_configs()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            for name in PRESETS:
                cfg = compose("config", overrides=["hydra.searchpath=[file://experiments/configs]",
                                                   f"+kernels=[all_fused,{name}]"])
                assert list(cfg.kernels.plugin_dirs) == ["experiments/kernels"]
                assert cfg.kernels.ops.linear == "triton"
                check_kernel_names(cfg.kernels)
    finally:
        os.chdir(cwd)
    assert not any((ROOT / "configs" / "kernels" / f"{name}.yaml").exists() for name in (*PRESETS, "layer_sites"))


# -- kernels against their native ops --------------------------------------------------------------------------
@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_embedding(experiments, dtype, scaled):
    """Odd widths (one column block, and two with a short second one), repeated ids, a (batch, seq) id shape,
    and Gemma's scale rounded to the table's dtype before the product, as the native rounds (the interpreter
    truncates bf16 where the GPU rounds: a bf16 product gets bf16's tolerance; a plain gather is exact)."""
    torch.manual_seed(int(scaled))
    scale = torch.tensor(37 ** 0.5) if scaled else None
    for hidden, ids in ((37, torch.tensor([5, 0, 96, 5])), (4096 + 3, torch.tensor([[1, 2, 3], [3, 2, 96]]))):
        table = weight(97, hidden, dtype=dtype)
        torch.testing.assert_close(get_op("embedding").impls["triton"].fn(ids, table, scale),
                                   get_op("embedding").native(ids, table, scale),
                                   **(TOL[dtype] if scaled else dict(atol=0, rtol=0)))


@inner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(1, None), (1, (16, 32, 2)), (3, (16, 16, 3)), (5, (16, 16, 1))])
def test_attn_out_onepass(experiments, core, dtype, rows, cfg):  # noqa: F811
    """The last GEMV program to arrive adds and normalizes every row, and leaves the arrival counters at zero
    for the next launch."""
    torch.manual_seed(rows)
    args = (torch.randn(rows, 71, dtype=dtype), weight(37, 71, dtype=dtype), torch.randn(rows, 37, dtype=dtype),
            weight(37, dtype=dtype) + 1, 1e-6)
    with config(core, cfg):
        normed, res = get_op("attn_out").impls["triton_onepass"].fn(*args)
    want_normed, want_res = native_site("attn_out")(*args)
    torch.testing.assert_close(res, want_res, **TOL[dtype])
    torch.testing.assert_close(normed, want_normed, **TOL[dtype])
    assert not experiments.counters(args[0].device, 1).any()


@inner
@pytest.mark.parametrize("splits,window", [(2, 0), (5, 0), (3, 6), (0, 0)])
def test_attention_decode_onepass(experiments, splits, window):
    """The last split of each (request, kv head) to arrive merges its group's heads: no merge launch, the
    same answer, counters back at zero. Requests shorter than a split's share leave splits empty."""
    torch.manual_seed(splits + 7)
    meta = paged_meta([1, 17, 70, 33])
    kc, vc = torch.randn(40, 4, 2, 12), torch.randn(40, 4, 2, 12)
    q = torch.randn(4, 6, 12)
    got = torch.ops.nanovllm_experiments.decode_attention_onepass(q, kc, vc, meta.block_tables, meta.positions, 0.3,
                                                                  window, 0.0, splits)
    want = get_op("attention_decode").native(q, kc, vc, meta, 0.3, window, 0.0)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert not experiments.counters(q.device, 1).any()
    torch.testing.assert_close(get_op("attention_decode").impls["triton_onepass"].fn(q, kc, vc, meta, 0.3, window),
                               want, **TOL[torch.float32])


@inner
@pytest.mark.parametrize("dtype,qk_norm,splits", [(torch.float32, True, 4), (torch.float32, False, 2),
                                                  (torch.bfloat16, True, 3)])
def test_rope_decode_attention_onepass(experiments, dtype, qk_norm, splits):
    """q/k norm + RoPE + KV write + attention with the splits merged in the kernel, against the natives: the
    output and both caches."""
    meta, args, caches = rope_attention_case(dtype, qk_norm, seed=splits)
    got = torch.ops.nanovllm_experiments.rope_decode_attention_onepass(
        *args, caches[0], caches[1], meta.slot_mapping, meta.block_tables, 0.3, 0, 0.0, splits)
    want = native_site("rope_decode_attention")(*args, caches[2], caches[3], meta, 0.3, 0, 0.0)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[2], **TOL[dtype])
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)
    assert not experiments.counters(args[0].device, 1).any()


@inner
@pytest.mark.parametrize("dtype,kv_lens,qk_norm,bias,window", LAYER_CASES)
def test_persistent_decode_layer(experiments, core, dtype, kv_lens, qk_norm, bias, window):  # noqa: F811
    """The persistent layer kernel (one launch per phase here: the interpreter runs programs one by one) against
    the native layer, as test_triton_kernels checks the chain; its split merges leave the counters at zero."""
    check_decode_layer(core, dtype, kv_lens, qk_norm, bias, window, backend="triton_persistent")
    assert not experiments.counters(torch.device("cpu"), 4).any(), "the merge counters are left armed"


# -- a whole model ---------------------------------------------------------------------------------------------
@inner
@pytest.mark.parametrize("name", PRESETS)
def test_preset_over_all_fused_tiny_model_matches_eager(experiments, make_checkpoint, name):
    """all_fused plus the experiment's preset, its plugin directory as the preset names it."""
    kernels = preset(ROOT / "configs/kernels/all_fused.yaml")
    extra = preset(EXPERIMENTS / "configs/kernels" / f"{name}.yaml")
    kernels["ops"].update(extra["ops"])
    kernels["plugin_dirs"] = extra["plugin_dirs"]
    check_tiny_model_matches_eager(make_checkpoint, kernels)
