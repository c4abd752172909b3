"""Hydra schema of `python -m nanovllm.serve` (configs/serve.yaml): the run schema plus a `server` node.

Registered from here rather than in nanovllm/config.py so the run entry's schema stays untouched;
serve.yaml lists this schema first, then `config` (which brings the model/engine groups and the
baseline kernel table), so `+kernels=<preset>` and every `run` override work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.config import register_configs

SERVE_SCHEMA_NAME = "nanovllm_serve_schema"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"         # 0.0.0.0 to listen on every interface (put a proxy and an API key in front)
    port: int = 8000
    api_key: str | None = None      # when set, /v1/* needs `Authorization: Bearer <key>`; from $NANOVLLM_API_KEY
    api_key_file: str | None = None  # or a file holding the key (never the key on the command line: api_keys.py)
    served_model_name: str | None = None  # the `model` clients send; default: model.name
    max_queued_requests: int = 256  # engine requests waiting for a slot before new ones get 429
    max_body_bytes: int = 4 << 20   # larger request bodies get 413
    warmup: bool = True             # run one short request before accepting traffic
    shutdown_grace_s: float = 30.0  # on SIGTERM: how long running requests may take to finish
    max_step_failures: int = 3      # consecutive failing model steps after which the engine stops for good
    log_level: str = "info"         # uvicorn's log level
    data_parallel: int = 1          # engine processes (one a GPU) behind this endpoint (nanovllm/serve/front.py)
    affinity_prefix_chars: int = 256  # data_parallel: prompts sharing this many first characters share a replica
    affinity_slack: int = 4         # data_parallel: requests a prefix's replica may have beyond the least busy one


def server_schema():
    """Only the `server` node: config.yaml's run schema (a RunConfig) merges over it, and OmegaConf keeps
    the key. A RunConfig subclass would not do: Hydra refuses to merge the run schema into it."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"server": OmegaConf.structured(ServerConfig)})


def serve_schema():
    """The full schema to re-check a composed config against: run schema + server."""
    from omegaconf import OmegaConf

    from nanovllm.config import run_schema

    return OmegaConf.merge(server_schema(), run_schema())


def register_serve_configs() -> None:
    from hydra.core.config_store import ConfigStore

    register_configs()  # config.yaml's own defaults name the run schema
    ConfigStore.instance().store(name=SERVE_SCHEMA_NAME, node=server_schema())


def check_serve_schema(cfg) -> None:
    """Re-check the composed config: `+server.typo=1` gets past Hydra's compose but not past this."""
    from omegaconf import OmegaConf

    OmegaConf.merge(serve_schema(), OmegaConf.to_container(cfg))
    server = cfg.server
    if not 0 <= server.port < 65536:
        raise ValueError(f"server.port={server.port} is not a TCP port (0-65535)")
    if server.max_body_bytes < 1024:
        raise ValueError(f"server.max_body_bytes must be >= 1024, got {server.max_body_bytes}")
    if server.max_queued_requests < 1:
        raise ValueError(f"server.max_queued_requests must be >= 1, got {server.max_queued_requests}")
    if server.shutdown_grace_s < 0:
        raise ValueError(f"server.shutdown_grace_s must be >= 0, got {server.shutdown_grace_s}")
    if server.max_step_failures < 1:
        raise ValueError(f"server.max_step_failures must be >= 1, got {server.max_step_failures}")
    if server.data_parallel < 1:
        raise ValueError(f"server.data_parallel must be >= 1, got {server.data_parallel}")
    if server.affinity_prefix_chars < 1 or server.affinity_slack < 0:
        raise ValueError("server.affinity_prefix_chars must be >= 1 and server.affinity_slack >= 0, got "
                         f"{server.affinity_prefix_chars} and {server.affinity_slack}")
    if server.api_key is not None and not server.api_key.strip():
        raise ValueError("server.api_key is empty; leave it null to serve without a key")
