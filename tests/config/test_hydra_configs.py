"""The Hydra config tree: every group file composes, override forms give the expected kernel tables,
and typos in keys or backend names fail before any model is built."""

from __future__ import annotations

import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from nanovllm.config import (
    RUN_TOP_LEVEL_ENGINE_ARGS,
    EngineArgs,
    EngineConfig,
    bench_sizes,
    check_kernel_names,
    check_schema,
    register_configs,
)
from nanovllm.ops import MODEL_SCOPE, OpResolver, RegistryError, Target, load_plugins
from tests.helpers import ROOT

CONFIGS = ROOT / "configs"
# groups selected with `group=name` (in config.yaml's defaults) or appended with `+group=name`
SELECTED, APPENDED = ("model", "engine"), ("kernels", "experiment")

register_configs()


def compose_run(overrides=(), config_dir: Path = CONFIGS, hydra_node: bool = False):
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def group_options():
    for group in SELECTED + APPENDED:
        for f in sorted((CONFIGS / group).glob("*.yaml")):
            yield group, f.stem


def table(cfg, num_layers: int = 4):
    """The resolved backend per (scope, op), through the engine's own resolver (nothing is compiled)."""
    import torch

    from nanovllm.ops import OPS

    r = OpResolver(OmegaConf.to_container(cfg.kernels), Target("cpu", torch.float32), num_layers)
    scopes = [str(i) for i in range(num_layers)] + [MODEL_SCOPE]
    return {s: {op: r.pick(s, op) for op in OPS} for s in scopes}


def test_primary_config_is_the_auto_table():
    """`auto` by default, which is the native op everywhere on the CPU; `+kernels=baseline` names it explicitly."""
    cfg = compose_run()
    check_schema(cfg)
    assert cfg.model.name == "default" and cfg.device == "auto" and cfg.dtype == "auto"
    assert OmegaConf.to_container(cfg.kernels) == {"default": "auto", "ops": {}, "layers": {}, "groups": {},
                                                   "plugin_dirs": [], "allow_fallback": True}
    assert all(b == "eager" for ops in table(cfg).values() for b in ops.values())
    assert compose_run(["+kernels=baseline"]).kernels.default == "eager"


def test_every_group_has_options():
    for group in SELECTED + APPENDED:
        assert list((CONFIGS / group).glob("*.yaml")), f"configs/{group}/ is empty"


@pytest.mark.parametrize("group,name", list(group_options()))
def test_group_option_composes(group, name):
    override = f"{group}={name}" if group in SELECTED else f"+{group}={name}"
    cfg = compose_run([override], hydra_node=group == "experiment")
    check_schema(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    if group == "engine":
        EngineConfig(model="x", device="cpu", **OmegaConf.to_container(cfg.engine))
    if group == "kernels":
        broken = {str(p): e for p, e in load_plugins().items() if e}
        try:
            check_kernel_names(cfg.kernels)
        except RegistryError as e:
            if broken:
                pytest.skip(f"kernels/{name}.yaml names a backend from a plugin that failed to load "
                            f"here ({broken}): {e}")
            raise
    if group == "experiment":
        assert cfg.hydra.sweeper.params, f"experiment/{name}.yaml sets no hydra.sweeper.params"


QUANT_PRESETS = ("fp8", "int8", "int4")  # they set engine.quantization too, so their package is _global_


def test_kernel_files_are_deltas_in_the_kernels_package():
    for f in (CONFIGS / "kernels").glob("*.yaml"):
        if f.stem in QUANT_PRESETS:
            assert f.read_text().startswith("# @package _global_"), f.name
            assert set(OmegaConf.load(f)) == {"engine", "kernels"}, f"{f.name}: only engine and kernels keys"
            continue
        assert f.read_text().startswith("# @package kernels"), f"{f.name}: start it with '# @package kernels'"
    defaults = OmegaConf.load(CONFIGS / "config.yaml").defaults
    assert not any("kernels" in (d if isinstance(d, str) else list(d)) for d in defaults), \
        "kernels must not be in config.yaml's defaults list, or `+kernels=<preset>` stops working"


def test_preset_appends_over_baseline():
    t = table(compose_run(["+kernels=compile"]))
    assert t["0"]["mlp"] == "compile" and t[MODEL_SCOPE]["sample"] == "compile"


def test_stacked_presets():
    cfg = compose_run(["+kernels=[compile_linear,compile_norms]"])
    assert dict(cfg.kernels.ops) == {"linear": "compile", "rms_norm": "compile", "add_rms_norm": "compile"}
    t = table(cfg)
    assert t["2"]["linear"] == t["2"]["rms_norm"] == "compile" and t["2"]["mlp"] == "eager"


def test_per_op_override_without_plus():
    t = table(compose_run(["kernels.ops.rms_norm=compile"]))
    assert t["0"]["rms_norm"] == t[MODEL_SCOPE]["rms_norm"] == "compile" and t["0"]["linear"] == "eager"


@pytest.mark.parametrize("form", ["++kernels.layers.1.mlp=eager", "kernels.layers.1.mlp=eager"])
def test_per_layer_override_beats_preset(form):
    cfg = compose_run(["+kernels=compile", form])
    assert OmegaConf.to_container(cfg.kernels.layers) == {"1": {"mlp": "eager"}}
    t = table(cfg)
    assert t["1"]["mlp"] == "eager" and t["0"]["mlp"] == t["2"]["mlp"] == "compile"


def test_override_after_preset_wins():
    cfg = compose_run(["+kernels=compile_norms", "kernels.ops.rms_norm=eager"])
    assert cfg.kernels.ops.rms_norm == "eager" and cfg.kernels.ops.add_rms_norm == "compile"


@pytest.mark.parametrize("override", ["devise=cpu", "engine.max_num_seq=4", "kernels.defualt=compile",
                                      "bench.decode_tokns=3", "engine.max_num_seqs=many"])
def test_typo_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        compose_run([override])


@pytest.mark.parametrize("override", ["+devise=cpu", "+engine.max_num_seq=4", "+kernels.opz.x=eager"])
def test_added_typo_fails_schema_check(override):
    cfg = compose_run([override])  # `+` opens the node during compose ...
    with pytest.raises((ConfigKeyError, ValidationError)):
        check_schema(cfg)  # ... so run.py checks the composed config against the schema again


def test_typo_in_a_group_file_fails(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    (tmp_path / "configs" / "engine" / "typo.yaml").write_text("max_num_seq: 4\n")
    with pytest.raises(ConfigCompositionException):
        compose_run(["engine=typo"], config_dir=tmp_path / "configs")


@pytest.mark.parametrize("override,valid", [
    ("kernels.ops.rms_norm=tritonn", "valid backends: "),
    ("kernels.ops.rmsnorm=eager", "valid ops: "),
    ("kernels.default=nope", "valid backends: "),
    ("++kernels.layers.3.mlp=nope", "valid backends: "),
    ("++kernels.layers.first.mlp=eager", "valid keys: "),
])
def test_unknown_names_fail_listing_valid_ones(override, valid):
    cfg = compose_run([override])
    with pytest.raises(RegistryError, match=valid) as e:
        check_kernel_names(cfg.kernels)
    if "backends" in valid:
        assert "eager" in str(e.value) and "compile" in str(e.value)


def test_engine_args_match_engine_config():
    """EngineArgs (the schema of configs/engine/) must list every EngineConfig field, same defaults."""
    def default(f):  # a nested config (speculative_config) as the plain dict Hydra composes
        return f.default if f.default is not MISSING else asdict(f.default_factory())

    ours = {f.name: default(f) for f in fields(EngineArgs)}
    theirs = {f.name: default(f) for f in fields(EngineConfig) if f.name not in RUN_TOP_LEVEL_ENGINE_ARGS}
    assert ours == theirs
    assert OmegaConf.to_container(compose_run().engine) == theirs


def test_bench_sizes_follow_device_unless_set():
    cfg = compose_run()
    cpu, gpu = bench_sizes(cfg.bench, "cpu"), bench_sizes(cfg.bench, "cuda")
    assert cpu == dict(cfg.bench.cpu) and gpu == dict(cfg.bench.gpu)
    assert cpu["decode_tokens"] <= 32 < gpu["decode_tokens"]
    cfg = compose_run(["bench.decode_tokens=5", "bench.cpu.warmup=0"])
    sizes = bench_sizes(cfg.bench, "cpu")
    assert sizes["decode_tokens"] == 5 and sizes["warmup"] == 0
    assert bench_sizes(cfg.bench, "cuda")["decode_tokens"] == 5


def test_layer_group_sweep_config():
    """The per-layer-group experiment: its groups compose, and a swept override lands on that half only."""
    cfg = compose_run(["+experiment=layer_groups", "++kernels.layers.second.mlp=compile"], hydra_node=True)
    params = cfg.hydra.sweeper.params
    assert set(params) >= {"++kernels.layers.first.mlp", "++kernels.layers.second.mlp"}
    del cfg.hydra
    check_kernel_names(cfg.kernels)
    t = table(cfg, num_layers=28)
    assert {t[str(i)]["mlp"] for i in range(14)} == {"eager"}
    assert {t[str(i)]["mlp"] for i in range(14, 28)} == {"compile"}
