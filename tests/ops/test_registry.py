"""Registry rules: resolution per op and per layer, clear errors, plugins, logged fallback."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from nanovllm import LLM
from nanovllm.ops import OPS, OpResolver, RegistryError, Target, get_op, load_plugins, register_impl
from nanovllm.ops.registry import define_op

CPU = Target("cpu", torch.float32)


def test_every_op_has_eager_and_compile():
    for name, op in OPS.items():
        assert {"eager", "compile"} <= set(op.impls), name


def test_unknown_op_lists_valid_ones():
    with pytest.raises(RegistryError, match="unknown op 'rms_nrom'.*valid ops: .*rms_norm"):
        OpResolver({"ops": {"rms_nrom": "eager"}}, CPU, 2)


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(RegistryError, match="unknown backend 'trition' for op 'mlp'; valid backends: auto, compile, "
                                            "eager"):
        OpResolver({"ops": {"mlp": "trition"}}, CPU, 2)
    with pytest.raises(RegistryError, match="unknown kernels.default backend 'fast'"):
        OpResolver({"default": "fast"}, CPU, 2)


def test_bad_layer_key():
    with pytest.raises(RegistryError, match="kernels.layers has key '7'; valid keys: 0..1"):
        OpResolver({"layers": {"7": {"mlp": "eager"}}}, CPU, 2)


def test_per_layer_beats_per_op_beats_default():
    r = OpResolver({"default": "compile", "ops": {"mlp": "eager"}, "layers": {"1": {"mlp": "compile"}}}, CPU, 2)
    r.scope(0, ("mlp", "norm_qkv"))
    r.scope(1, ("mlp",))
    assert r.table["0"]["mlp"] == "eager" and r.table["1"]["mlp"] == "compile"
    assert r.table["0"]["norm_qkv"] == "compile" and r.table["0"]["linear"] == "compile"


def test_layer_groups_sit_between_layers_and_ops():
    kernels = {"default": "eager", "ops": {"mlp": "compile"}, "groups": {"front": "0-1", "odd": "1,3"},
               "layers": {"front": {"mlp": "eager", "linear": "compile"}, "odd": {"linear": "eager"},
                          "1": {"mlp": "compile"}}}
    r = OpResolver(kernels, CPU, 4)
    for i in range(4):
        r.scope(i, ("mlp",))
    assert [r.table[str(i)]["mlp"] for i in range(4)] == ["eager", "compile", "compile", "compile"]
    assert [r.table[str(i)]["linear"] for i in range(4)] == ["compile", "compile", "eager", "eager"]


@pytest.mark.parametrize("groups,layers,message", [
    ({"front": "0-9"}, {}, "layers \\[4, 5, 6, 7, 8, 9\\] outside 0..3"),
    ({"front": "a-b"}, {}, "write layer indices and ranges"),
    ({"7": "0-1"}, {}, "name '7' is taken by a layer key"),
    ({}, {"front": {"mlp": "eager"}}, "valid keys: 0..3, 'model' and the names in kernels.groups \\(none\\)"),
])
def test_bad_layer_groups(groups, layers, message):
    with pytest.raises(RegistryError, match=message):
        OpResolver({"groups": groups, "layers": layers}, CPU, 4)


def test_registering_twice_or_reserved_names_fails():
    with pytest.raises(RegistryError, match="built in"):
        register_impl("rms_norm", "eager")(lambda *a: None)
    with pytest.raises(RegistryError, match="defined twice"):
        define_op("rms_norm")(lambda *a: None)


PLUGIN = textwrap.dedent('''
    import torch
    from nanovllm.ops import register_impl

    @register_impl("silu_and_mul", "test_gpu_only", devices=("cuda",))
    def silu_and_mul_gpu(x):
        raise AssertionError("must not run on the CPU")

    @register_impl("silu_and_mul", "test_doubling")
    def silu_and_mul_doubled(x):
        gate, up = x.chunk(2, dim=-1)
        return 2 * torch.nn.functional.silu(gate) * up
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugins")
    (d / "my_kernel.py").write_text(PLUGIN)
    (d / "broken.py").write_text("raise ImportError('no such library')\n")
    load_plugins([d])
    return d


def test_plugin_from_extra_directory(plugin_dir):
    assert {"test_gpu_only", "test_doubling"} <= set(get_op("silu_and_mul").impls)
    errors = {p.name: e for p, e in load_plugins([plugin_dir]).items()}
    assert "no such library" in errors["broken.py"] and errors["my_kernel.py"] is None


def test_unsupported_backend_falls_back_with_a_warning(plugin_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="nanovllm.ops"):
        r = OpResolver({"ops": {"silu_and_mul": "test_gpu_only"}, "plugin_dirs": [str(plugin_dir)]}, CPU, 1)
        ops = r.scope(0, ("mlp",))
    assert r.table["0"]["silu_and_mul"] == "eager"
    assert "unsupported here (device 'cpu' not in ['cuda']); falling back to 'eager'" in caplog.text
    x = torch.randn(3, 8)
    torch.testing.assert_close(ops.mlp(x, torch.randn(10, 8), torch.randn(8, 5), None).shape, torch.Size([3, 8]))


def test_fallback_can_be_forbidden(plugin_dir):
    r = OpResolver({"ops": {"silu_and_mul": "test_gpu_only"}, "allow_fallback": False}, CPU, 1)
    with pytest.raises(RegistryError, match="allow_fallback"):
        r.scope(0, ("mlp",))


def test_missing_plugin_dir_is_an_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plugins(["/nonexistent/kernels"])


def test_per_layer_kernel_changes_that_layer_only(plugin_dir, tiny_model):
    """A plugin backend chosen for layer 1 changes the logits; the table records it per layer."""
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    base = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16)
    mixed = LLM(str(tiny_model), max_model_len=128, num_kvcache_blocks=16,
                kernels={"layers": {"1": {"silu_and_mul": "test_doubling"}}, "plugin_dirs": [str(plugin_dir)]})
    assert mixed.kernel_table["1"]["silu_and_mul"] == "test_doubling"
    assert mixed.kernel_table["0"]["silu_and_mul"] == "eager"
    a = teacher_forced_logits(base.engine, [1, 2, 3], [4])
    b = teacher_forced_logits(mixed.engine, [1, 2, 3], [4])
    assert not torch.allclose(a, b)


def test_cli_prints_the_registry():
    out = subprocess.run([sys.executable, "-m", "nanovllm.ops"], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "200", "PATH": ""}).stdout
    for name in OPS:
        if not name.startswith("test_"):
            assert name in out
    assert "site = linear + silu_and_mul" in out
