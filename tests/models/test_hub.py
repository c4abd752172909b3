"""Hugging Face repo ids as models: the local cache first, else a download of only the files the engine
reads; revisions pinned; HF_HUB_OFFLINE respected; clear errors. The hub is mocked: no test touches the network."""

import shutil
from pathlib import Path

import pytest
from huggingface_hub import errors

from nanovllm.checkpoints import HubModelError, resolve_model
from nanovllm.checkpoints.hub import ALLOW_PATTERNS, looks_like_repo_id


def hub_error(cls, message: str = "hub says no"):
    """A huggingface_hub HTTP error without an HTTP response behind it."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: `repos` maps repo id -> files (name -> bytes or a
    folder to copy); downloads land in the HF_HUB_CACHE layout under snapshots/<revision or 'main-sha'>."""

    def __init__(self, cache: Path, repos: dict, fail: Exception | None = None):
        self.cache, self.repos, self.fail, self.calls = cache, repos, fail, []

    def snapshot(self, repo_id: str, revision: str | None) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / (revision or "main-sha")

    def __call__(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None,
                 **kwargs):
        self.calls.append(dict(repo_id=repo_id, revision=revision, local_files_only=local_files_only,
                               allow_patterns=allow_patterns, cache_dir=cache_dir))
        assert Path(cache_dir) == self.cache
        snap = self.snapshot(repo_id, revision)
        if local_files_only:
            if not snap.is_dir():
                raise errors.LocalEntryNotFoundError(f"{repo_id} is not cached")
            return str(snap)
        if self.fail is not None:
            raise self.fail
        if repo_id not in self.repos:
            raise hub_error(errors.RepositoryNotFoundError)
        snap.mkdir(parents=True, exist_ok=True)
        for name, content in self.repos[repo_id].items():
            if isinstance(content, Path):
                shutil.copy(content, snap / name)
            else:
                (snap / name).write_bytes(content)
        return str(snap)

    @property
    def downloads(self) -> list[dict]:
        return [c for c in self.calls if not c["local_files_only"]]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub(cache, {"acme/small": {"config.json": b'{"model_type": "qwen3"}', "model.safetensors": b"w"}})
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    return fake


def test_repo_ids_and_paths_are_told_apart():
    assert looks_like_repo_id("Qwen/Qwen3-0.6B")
    for name in ("./a/b", "/abs/path", "~/x/y", "a/b/c", "tiny", "bad name/x"):
        assert not looks_like_repo_id(name), name


def test_missing_repo_is_downloaded_with_only_the_engine_files(fake_hub):
    folder = resolve_model("acme/small")
    assert folder == fake_hub.snapshot("acme/small", None) and (folder / "config.json").is_file()
    [download] = fake_hub.downloads
    assert download["repo_id"] == "acme/small" and download["revision"] is None
    assert download["allow_patterns"] == ALLOW_PATTERNS
    assert {"config.json", "*.safetensors", "tokenizer.json", "generation_config.json",
            "chat_template.jinja"} <= set(ALLOW_PATTERNS)
    assert not any(p.endswith((".bin", ".gguf", ".pt")) for p in ALLOW_PATTERNS)


def test_cached_repo_is_not_downloaded_again(fake_hub):
    first = resolve_model("acme/small")
    assert resolve_model("acme/small") == first
    assert len(fake_hub.downloads) == 1


def test_revision_is_pinned(fake_hub):
    folder = resolve_model("acme/small", revision="v1.0")
    assert folder == fake_hub.snapshot("acme/small", "v1.0")
    assert [c["revision"] for c in fake_hub.downloads] == ["v1.0"]
    with pytest.raises(ValueError, match="revision='v1.0' applies to Hugging Face repo ids"):
        resolve_model("tiny", revision="v1.0")


def test_cached_snapshot_without_weights_is_completed_online(fake_hub):
    partial = fake_hub.snapshot("acme/small", None)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text('{"model_type": "qwen3"}')  # e.g. only the config was fetched
    assert resolve_model("acme/small") == partial
    assert len(fake_hub.downloads) == 1 and (partial / "model.safetensors").is_file()


def test_offline_uses_only_the_cache(fake_hub, monkeypatch):
    resolve_model("acme/small")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/small") == fake_hub.snapshot("acme/small", None)
    with pytest.raises(HubModelError, match=r"'acme/other'.*HF_HUB_OFFLINE=1.*unset HF_HUB_OFFLINE"):
        resolve_model("acme/other")
    assert len(fake_hub.downloads) == 1


@pytest.mark.parametrize("error, message", [
    (hub_error(errors.RepositoryNotFoundError),
     r"'acme/nope' \(revision 'v9'\) is neither a local folder nor a repo on the Hugging Face Hub.*hf auth login"),
    (hub_error(errors.GatedRepoError), r"'acme/nope' \(revision 'v9'\) is gated.*https://huggingface.co/acme/nope"),
    (hub_error(errors.RevisionNotFoundError), r"'acme/nope' has no revision 'v9'"),
    (errors.LocalEntryNotFoundError("connection refused"), r"'acme/nope' \(revision 'v9'\) is not in the local "
                                                           r"Hugging Face cache.*could not be downloaded"),
])
def test_hub_failures_name_the_repo_and_what_to_do(fake_hub, error, message):
    fake_hub.fail = error
    with pytest.raises(HubModelError, match=message):
        resolve_model("acme/nope", revision="v9")


def test_unknown_repo_without_a_connection_still_says_so(fake_hub):
    fake_hub.fail = None
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a repo"):
        resolve_model("acme/absent")


def test_repo_without_safetensors_is_refused(fake_hub):
    fake_hub.repos["acme/bin-only"] = {"config.json": b'{"model_type": "llama"}'}
    with pytest.raises(HubModelError, match=r"'acme/bin-only' has no \*\.safetensors weights"):
        resolve_model("acme/bin-only")


def test_llm_runs_a_downloaded_repo(fake_hub, tmp_path, monkeypatch):
    """LLM("org/name", revision=...) downloads the repo once and generates from it."""
    from nanovllm import LLM, SamplingParams

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "nanovllm"))
    tiny = resolve_model("tiny")
    fake_hub.repos["acme/tiny-qwen3"] = {f.name: f for f in tiny.iterdir() if f.is_file()}
    llm = LLM("acme/tiny-qwen3", revision="abc123", device="cpu", enforce_eager=True, max_model_len=128,
              num_kvcache_blocks=16)
    try:
        [out] = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=3))
        assert len(out["token_ids"]) == 3
    finally:
        llm.close()
    assert [(c["repo_id"], c["revision"]) for c in fake_hub.downloads] == [("acme/tiny-qwen3", "abc123")]


def test_run_and_serve_configs_take_model_revision():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from nanovllm.config import EngineConfig, register_configs
    from nanovllm.resources import configs_dir
    from nanovllm.serve.schema import register_serve_configs

    register_configs()
    register_serve_configs()
    with initialize_config_dir(str(configs_dir()), version_base="1.3"):
        for name in ("config", "serve"):
            cfg = compose(name, overrides=["model.name=Qwen/Qwen3-0.6B", "model.revision=v1.0"])
            assert (cfg.model.name, cfg.model.revision) == ("Qwen/Qwen3-0.6B", "v1.0")
        assert compose("config").model.revision is None
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["engine.revision=v1.0"])  # the revision belongs to the model node
    assert EngineConfig.from_kwargs("Qwen/Qwen3-0.6B", revision="v1.0", device="cpu").revision == "v1.0"
