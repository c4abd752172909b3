"""The `nanovllm` command: `nanovllm run|serve|bench|ops ...`, beside `python -m nanovllm.<command>`.

`run` and `serve` take the flags other inference servers use and turn them into Hydra overrides:

    nanovllm serve Qwen/Qwen3-0.6B --port 8000 --max-model-len 4096 --kernels all_fused
    # is: python -m nanovllm.serve model.name=Qwen/Qwen3-0.6B server.port=8000 \
    #       engine.max_model_len=4096 +kernels=all_fused

`key=value` arguments are Hydra overrides and pass through unchanged, as do Hydra's own flags (--cfg job,
--help, -m, ...). `bench` and `ops` pass every argument to `python -m nanovllm.bench` / `nanovllm.ops`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

COMMANDS = ("run", "serve", "bench", "ops")


@dataclass(frozen=True)
class Flag:
    key: str                 # the Hydra key the value is written to
    help: str
    kind: str = "value"      # value | switch (no value, writes `value`) | optional (a switch that may take =VALUE)
    #                          | kernels | list | secret | secret-file
    value: str = "true"      # what a switch writes
    serve_only: bool = False


FLAGS: dict[str, Flag] = {
    "--model": Flag("model.name", "model: catalog name, folder, .gguf file or Hugging Face repo id (or positional)"),
    "--revision": Flag("model.revision", "branch, tag or commit of a Hugging Face repo"),
    "--device": Flag("device", "auto | cpu | cuda | cuda:N"),
    "--dtype": Flag("dtype", "auto | bfloat16 | float16 | float32"),
    "--max-model-len": Flag("engine.max_model_len", "longest sequence (prompt + output) in tokens"),
    "--max-num-seqs": Flag("engine.max_num_seqs", "most sequences in one batch"),
    "--max-num-batched-tokens": Flag("engine.max_num_batched_tokens", "most tokens in one forward pass"),
    "--gpu-memory-utilization": Flag("engine.gpu_memory_utilization", "share of GPU memory the engine may use"),
    "--cpu-offload-gb": Flag("engine.cpu_offload_gb", "GiB of layer weights kept in host memory, streamed to the GPU"),
    "--block-size": Flag("engine.kvcache_block_size", "tokens per KV-cache block"),
    "--num-kvcache-blocks": Flag("engine.num_kvcache_blocks", "KV-cache blocks (-1: sized from memory)"),
    "--kv-offload-gb": Flag("engine.kv_offload_gb", "GiB of pinned host memory for a KV host tier (0: off)"),
    "--preemption-mode": Flag("engine.preemption_mode", "auto | recompute | swap (swap needs --kv-offload-gb)"),
    "--seed": Flag("engine.seed", "random seed"),
    "--kv-cache-dtype": Flag("engine.kv_cache_dtype", "KV cache element type: auto (the model dtype) | fp8"),
    "--enforce-eager": Flag("engine.enforce_eager", "no CUDA graphs", kind="switch"),
    "--enable-prefix-caching": Flag("engine.enable_prefix_caching", "reuse KV blocks of shared prefixes",
                                    kind="switch"),
    "--no-enable-prefix-caching": Flag("engine.enable_prefix_caching", "no prefix caching", kind="switch",
                                       value="false"),
    "--quantization": Flag("engine.quantization", "quantize the weights on load: fp8 | int8 | int4 (none: as stored)"),
    "--quantization-group-size": Flag("engine.quantization_group_size", "int4 group size: 32 | 64 | 128"),
    "--quantization-zero-point": Flag("engine.quantization_symmetric", "int4 with a zero point per group",
                                      kind="switch", value="false"),
    "--quantization-skip": Flag("engine.quantization_skip", "layers kept dense, e.g. first,last or 0-2,27"),
    "--quantize-lm-head": Flag("engine.quantization_lm_head", "quantize the LM head too", kind="switch"),
    "--quantization-calibrate": Flag("engine.quantization_calibrate",
                                     "fit the weights to the shipped calibration text: alone, the format's default; "
                                     "=awq | gptq | awq+gptq", kind="optional"),
    "--kernels": Flag("kernels", "kernel preset(s) from configs/kernels, e.g. all_fused or a,b", kind="kernels"),
    "--plugin-dir": Flag("kernels.plugin_dirs", "extra kernel plugin directory (repeatable)", kind="list"),
    "--host": Flag("server.host", "address to listen on (0.0.0.0: every interface)", serve_only=True),
    "--port": Flag("server.port", "port to listen on", serve_only=True),
    "--api-key": Flag("NANOVLLM_API_KEY", "key clients must send (prefer --api-key-file: argv is public)",
                      kind="secret", serve_only=True),
    "--api-key-file": Flag("NANOVLLM_API_KEY", "file holding the API key", kind="secret-file", serve_only=True),
    "--served-model-name": Flag("server.served_model_name", "the model name clients send", serve_only=True),
    "--max-queued-requests": Flag("server.max_queued_requests", "waiting requests before 429", serve_only=True),
    "--no-warmup": Flag("server.warmup", "skip the warm-up request", kind="switch", value="false", serve_only=True),
    "--log-level": Flag("server.log_level", "uvicorn log level", serve_only=True),
    "--uvicorn-log-level": Flag("server.log_level", "uvicorn log level", serve_only=True),
}
# Hydra's own flags, passed through as they are: name -> whether it takes a value.
HYDRA_FLAGS = {"--help": False, "-h": False, "--hydra-help": False, "--version": False, "--cfg": True, "-c": True,
               "--resolve": False, "--package": True, "-p": True, "--info": False, "-i": False, "--multirun": False,
               "-m": False, "--run": False, "-r": False, "--config-path": True, "-cp": True, "--config-name": True,
               "-cn": True, "--config-dir": True, "-cd": True, "--shell-completion": False, "-sc": False}
HYDRA_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


class CliError(ValueError):
    """A command line that cannot be turned into Hydra overrides."""


@dataclass
class HydraArgs:
    argv: list[str] = field(default_factory=list)       # Hydra flags, then overrides
    env: dict[str, str] = field(default_factory=dict)   # secrets go through the environment, never into argv


def flags_for(command: str) -> dict[str, Flag]:
    return {n: f for n, f in FLAGS.items() if command == "serve" or not f.serve_only}


def to_hydra(command: str, args: list[str], model_presets=(), kernel_presets=()) -> HydraArgs:
    """Turn `nanovllm run|serve` arguments into Hydra's argv. `model_presets` are the configs/model names
    (a positional model that is one becomes `model=NAME`); `kernel_presets` validate --kernels when given."""
    known = flags_for(command)
    out, hydra_flags, kernels, plugin_dirs = HydraArgs(), [], [], []
    model = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, inline = arg.partition("=")
        if arg in HYDRA_FLAGS:
            hydra_flags.append(arg)
            if HYDRA_FLAGS[arg] or (arg in ("--info", "-i") and i < len(args) and args[i] in HYDRA_INFO):
                if i >= len(args):
                    raise CliError(f"{arg} needs a value")
                hydra_flags.append(args[i])
                i += 1
        elif arg.startswith("-"):
            if name not in known:
                raise CliError(f"unknown flag {name!r} for `nanovllm {command}`; known flags: "
                               f"{', '.join(sorted(known))} (and Hydra's: {', '.join(sorted(HYDRA_FLAGS))}); "
                               f"any key=value is passed to Hydra as an override")
            flag = known[name]
            if flag.kind == "optional" and not eq:
                out.argv.append(f"{flag.key}={flag.value}")
                continue
            if flag.kind == "switch":
                if eq:
                    raise CliError(f"{name} takes no value")
                out.argv.append(f"{flag.key}={flag.value}")
                continue
            if not eq:
                if i >= len(args):
                    raise CliError(f"{name} needs a value")
                inline, i = args[i], i + 1
            if name == "--model":
                model = _one_model(model, inline)
            elif flag.kind == "kernels":
                kernels += _split_presets(inline, kernel_presets)
            elif flag.kind == "list":
                plugin_dirs.append(inline)
            elif flag.kind == "secret":
                out.env[flag.key] = inline
            elif flag.kind == "secret-file":
                out.env[flag.key] = _read_secret(inline, name)
            else:
                out.argv.append(f"{flag.key}={hydra_value(inline)}")
        elif eq or arg.startswith("~"):
            out.argv.append(arg)  # a Hydra override (key=value, +key=value, ~key): passed through unchanged
        else:
            model = _one_model(model, arg)
    if model is not None:
        out.argv.insert(0, f"model={model}" if model in model_presets else f"model.name={hydra_value(model)}")
    if kernels:
        out.argv.append(f"+kernels={kernels[0]}" if len(kernels) == 1 else f"+kernels=[{','.join(kernels)}]")
    if plugin_dirs:
        out.argv.append(f"kernels.plugin_dirs=[{','.join(hydra_value(d) for d in plugin_dirs)}]")
    out.argv[:0] = hydra_flags
    return out


def hydra_value(text: str) -> str:
    """A string as a Hydra override value: bare when Hydra reads it back unchanged, else single-quoted."""
    if re.fullmatch(r"[\w./:@+-]+", text) and text.lower() not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _one_model(current: str | None, model: str) -> str:
    if current is not None:
        raise CliError(f"two models given ({current!r} and {model!r}); Hydra overrides look like key=value")
    return model


def _split_presets(text: str, kernel_presets) -> list[str]:
    names = [n for n in re.split(r"[,+]", text.strip("[]")) if n]
    unknown = [n for n in names if kernel_presets and n not in kernel_presets]
    if not names or unknown:
        raise CliError(f"--kernels {text!r}: unknown preset(s) {unknown or [text]}; presets: "
                       f"{', '.join(kernel_presets)}")
    return names


def _read_secret(path: str, flag: str) -> str:
    try:
        secret = open(os.path.expanduser(path)).read().strip()
    except OSError as e:
        raise CliError(f"{flag} {path!r}: {e.strerror}") from None
    if not secret:
        raise CliError(f"{flag} {path!r} is empty")
    return secret


def usage(command: str) -> str:
    lines = [f"usage: nanovllm {command} [MODEL] [flags] [key=value Hydra overrides]", "", "flags:"]
    for name, flag in flags_for(command).items():
        lines.append(f"  {name:<26} {flag.help} [{_target(flag)}]")
    return "\n".join(lines)


def _target(flag: Flag) -> str:
    """What a flag becomes, for the usage text."""
    if flag.kind in ("secret", "secret-file"):
        return f"env {flag.key}"
    if flag.kind == "kernels":
        return "+kernels=..."
    if flag.kind == "optional":
        return f"{flag.key}={flag.value}|..."
    return f"{flag.key}={flag.value if flag.kind == 'switch' else '...'}"


def _presets(group: str) -> list[str]:
    from nanovllm.resources import configs_dir

    return sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))


def _hydra_command(command: str, args: list[str]) -> int:
    try:
        hydra = to_hydra(command, args, _presets("model"), _presets("kernels"))
    except CliError as e:
        print(f"nanovllm {command}: error: {e}", file=sys.stderr)
        return 2
    if "--help" in hydra.argv or "-h" in hydra.argv:
        print(usage(command) + "\n")
    os.environ.update(hydra.env)
    if command == "run":
        from nanovllm.run import main as entry
    else:
        from nanovllm.serve.__main__ import main as entry
    sys.argv = [f"nanovllm {command}", *hydra.argv]  # @hydra.main reads its overrides from sys.argv
    entry()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.split("\n\n")[0] + f"\n\nusage: nanovllm {{{','.join(COMMANDS)}}} ...\n"
              "  nanovllm run [MODEL] ...    build the engine, run prompts, benchmark batch-1 decode\n"
              "  nanovllm serve [MODEL] ...  an OpenAI-compatible HTTP server\n"
              "  nanovllm bench COMMAND ...  benchmarks (python -m nanovllm.bench --help)\n"
              "  nanovllm ops ...            the op registry: ops x backends\n"
              "`nanovllm run --help` and `nanovllm serve --help` list the flags and the presets.",
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from nanovllm.bench.__main__ import main as bench

        return bench(rest)
    if command == "ops":
        from nanovllm.ops.__main__ import main as ops

        return ops(rest) or 0
    return _hydra_command(command, rest)


def run_main() -> int:
    return main(["run", *sys.argv[1:]])


def serve_main() -> int:
    return main(["serve", *sys.argv[1:]])


def bench_main() -> int:
    return main(["bench", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
