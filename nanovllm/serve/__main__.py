"""Hydra entry point: python -m nanovllm.serve [overrides]

Takes the same model/engine/kernel overrides as `python -m nanovllm.run`, plus `server.*`:
    python -m nanovllm.serve model=tiny server.host=127.0.0.1 server.port=8000

Exits 0 after a graceful shutdown (SIGTERM), 1 if the engine stopped for good (a supervisor restarts it),
2 for a refused command line (an API key given as an override).
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from nanovllm.config import check_kernel_names
from nanovllm.resources import hydra_config_path
from nanovllm.serve.api_keys import APIKeyOverrideError, refuse_api_key_override, resolve_api_key
from nanovllm.serve.schema import check_serve_schema, register_serve_configs

log = logging.getLogger("nanovllm.serve")

register_serve_configs()  # before @hydra.main composes: serve.yaml extends the schema stored here


def build_engine(cfg: DictConfig):
    from nanovllm.config import EngineConfig
    from nanovllm.engine.llm_engine import LLMEngine

    config = EngineConfig.from_kwargs(cfg.model.name, revision=cfg.model.revision, device=cfg.device,
                                      dtype=cfg.dtype, kernels=OmegaConf.to_container(cfg.kernels, resolve=True),
                                      **OmegaConf.to_container(cfg.engine, resolve=True))
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    log.info("built %s on %s (%s) in %.1f s; %s", cfg.model.name, config.device, config.dtype,
             time.perf_counter() - t0, engine.runner.kv_cache_summary)
    return engine


def warmup(engine) -> None:
    """One greedy and one sampled request with logprobs, and the decode graphs of every batch size, so no
    client pays for lazy initialisation (torch.compile, allocator growth, graph capture)."""
    from nanovllm.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine.runner.capture_all_graphs()
    engine.add_request("warmup", SamplingParams(temperature=0.0, max_tokens=4))
    engine.add_request("warmup", SamplingParams(temperature=1.0, max_tokens=4, logprobs=1, seed=0))
    for _ in range(1000):  # bounded: two 4-token requests finish in a handful of steps
        if not engine.has_unfinished():
            break
        engine.step()
    log.info("warmup done in %.1f s", time.perf_counter() - t0)


@hydra.main(config_path=hydra_config_path(), config_name="serve", version_base="1.3")
def _serve(cfg: DictConfig) -> None:
    from nanovllm.serve.app import create_app
    from nanovllm.serve.server import run_server

    check_serve_schema(cfg)
    check_kernel_names(cfg.kernels)
    server = cfg.server
    api_key = resolve_api_key(server.api_key, server.api_key_file)
    if server.data_parallel > 1:  # a front over N replicas, each this entry point with data_parallel=1
        from hydra.core.hydra_config import HydraConfig

        from nanovllm.serve.front import run_front

        hydra_cfg = HydraConfig.get()
        status = run_front(cfg, list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
        if status:
            raise SystemExit(status)
        return
    engine = build_engine(cfg)
    try:
        if server.warmup:
            warmup(engine)
        app = create_app(engine, model_name=server.served_model_name or str(cfg.model.name),
                         api_key=api_key, max_queued_requests=server.max_queued_requests,
                         max_body_bytes=server.max_body_bytes, shutdown_grace_s=server.shutdown_grace_s,
                         max_step_failures=server.max_step_failures)
        status = run_server(app, host=server.host, port=server.port, log_level=server.log_level)
    finally:
        engine.runner.close()
    if status:
        raise SystemExit(status)


def main() -> None:
    """Refuse a key on the command line before Hydra records the overrides, then run the server."""
    try:
        refuse_api_key_override(sys.argv[1:])
    except APIKeyOverrideError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _serve()


if __name__ == "__main__":
    main()
