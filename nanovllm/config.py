"""Configuration schemas. The engine's dataclass validates itself; the Hydra schemas (registered in
Hydra's ConfigStore by `register_configs`) make typos in config keys fail when the config is composed."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float64": torch.float64, "fp64": torch.float64}


@dataclass
class KernelConfig:
    """Which backend implements each op: `layers[N][op]` beats `layers[group][op]` beats `ops[op]` beats
    `default`. `groups` names sets of layers ("0-13", "0,2,5-7") that `layers` may use as keys."""

    default: str = "auto"           # auto: the fastest validated backend per op (nanovllm/ops/auto.py)
    ops: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, str]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    plugin_dirs: list[str] = field(default_factory=list)
    allow_fallback: bool = True


# ---- speculative decoding -------------------------------------------------------------------------------
SPECULATIVE_METHODS = ("ngram", "draft_model", "oracle")  # built in; plugins may register more (engine/spec)


@dataclass
class SpeculativeConfig:
    """Speculative decoding, in vLLM's shape: `{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4, "prompt_lookup_min": 2}` or `{"method": "draft_model", "model": NAME_OR_PATH,
    "num_speculative_tokens": 4}`. `method` None (the default) turns speculation off."""

    method: str | None = None       # ngram | draft_model | oracle | a plugin's name (nanovllm/engine/spec)
    num_speculative_tokens: int = 4  # k: tokens proposed per step; a verify step scores k + 1 per sequence
    prompt_lookup_max: int = 4      # ngram: longest suffix n-gram looked up in the sequence's own tokens
    prompt_lookup_min: int = 2      # ngram: shortest
    model: str | None = None        # draft_model: catalog name, local folder or repo id (same tokenizer)
    revision: str | None = None     # draft_model: its revision
    # Speculate while a decode batch has at most this many sequences; larger batches decode plainly (there
    # the GPU is compute-bound and verifying rejected tokens costs throughput).
    max_batch_size: int = 8

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.max_batch_size < 1:
            raise ValueError(f"speculative_config.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative_config method "draft_model" needs "model" (a name or path)')

    @property
    def enabled(self) -> bool:
        return self.method is not None


PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass
class EngineConfig:
    model: str = "default"         # catalog name, local folder, .gguf file or Hugging Face repo id (org/name)
    revision: str | None = None    # a Hugging Face repo's branch, tag or commit (None: its default branch)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto: bfloat16 on GPU, float32 on CPU
    # auto: K/V in the model dtype; fp8: float8_e4m3fn with a float32 scale per KV head and layer (the
    # checkpoint's k_scale/v_scale, else calibrated at load; nanovllm/engine/kv_scales.py): half the bytes of bf16
    kv_cache_dtype: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kvcache_block_size: int = 16
    num_kvcache_blocks: int = -1    # -1: size from gpu_memory_utilization (GPU) or cpu_kvcache_gib (CPU)
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_gib: float = 1.0
    # weight offloading (docs/memory.md): GiB of decoder-layer weights kept in host memory, streamed per layer
    cpu_offload_gb: float = 0.0
    # ---- KV host tier (docs/memory.md): prefix blocks evicted from the device cache and swapped-out sequences
    kv_offload_gb: float = 0.0       # GiB of (pinned) host memory for KV blocks; 0: no host tier
    preemption_mode: str = "auto"    # auto | recompute | swap (auto: swap when measured cheaper; needs the tier)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False     # no CUDA graphs
    compile_model: bool = False     # torch.compile the whole forward pass (fullgraph), registry ops inside
    # Launch the next decode step before reading this one's tokens, so the host's work overlaps the GPU's
    # (decode steps through CUDA graphs without logprobs; other steps run synchronously)
    async_scheduling: bool = True
    # Decode graphs of up to 8 rows are captured twice: for the full block table and for one this many tokens
    # wide (0: not), replayed while every row fits. Kernels sized from the table then fit short contexts
    # (the Triton attention's split count, the native attention's key count).
    short_context_graphs: int = 512
    seed: int = 0
    # Weights quantized on load (docs/quantization.md): None (as the checkpoint has them) | fp8 | int8 | int4.
    # fp8 and int8 per output channel; int4 in groups of quantization_group_size (32, 64, 128), symmetric or with
    # a zero point. quantization_skip: layers kept dense ("first,last", "0-2,27"); lm_head stays dense unless
    # quantization_lm_head; quantization_calibrate: fit the weights to a calibration text: awq (activation-aware
    # scales), gptq (error-compensating rounding), awq+gptq, true (the format's default) or false (round to nearest).
    quantization: str | None = None
    quantization_group_size: int = 128
    quantization_symmetric: bool = True
    quantization_skip: str | None = None
    quantization_lm_head: bool = False
    quantization_calibrate: bool | str = False
    kernels: KernelConfig = field(default_factory=KernelConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        if isinstance(self.kernels, dict):
            self.kernels = KernelConfig(**self.kernels)
        if self.speculative_config is None:
            self.speculative_config = SpeculativeConfig()
        elif isinstance(self.speculative_config, dict):
            known = {f.name for f in fields(SpeculativeConfig)}
            unknown = sorted(set(self.speculative_config) - known)
            if unknown:
                raise ValueError(f"unknown speculative_config key(s) {unknown}; valid: {sorted(known)}")
            self.speculative_config = SpeculativeConfig(**self.speculative_config)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA GPU is available; use device=cpu")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        from nanovllm.ops.kv_quant import normalize

        self.kv_cache_dtype = normalize(self.kv_cache_dtype)
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kvcache_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.short_context_graphs < 0:
            raise ValueError(f"short_context_graphs must be >= 0 (0: off), got {self.short_context_graphs}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.cpu_offload_gb >= 0:
            raise ValueError(f"cpu_offload_gb must be >= 0 (GiB of weights in host memory; 0: off), got "
                             f"{self.cpu_offload_gb}")
        if self.cpu_offload_gb and self.compile_model:
            raise ValueError("cpu_offload_gb does not work with compile_model (the weight copies run on their own "
                             "stream); set one of them off")
        if not self.kv_offload_gb >= 0:
            raise ValueError(f"kv_offload_gb must be >= 0 (0: no KV host tier), got {self.kv_offload_gb}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.preemption_mode == "swap" and self.kv_offload_gb == 0:
            raise ValueError("preemption_mode=swap needs a KV host tier to swap to: set kv_offload_gb > 0")
        if self.num_kvcache_blocks == 0 or self.num_kvcache_blocks < -1:
            raise ValueError(f"num_kvcache_blocks must be -1 (auto) or >= 1, got {self.num_kvcache_blocks}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        from nanovllm.quant.plan import QuantSpec, calibration_method

        if isinstance(self.quantization, str) and self.quantization.lower() in ("none", "dense", ""):
            self.quantization = None
        if self.quantization is None:
            set_without = [name for name, default in (("quantization_skip", None), ("quantization_lm_head", False))
                           if getattr(self, name) != default]
            if calibration_method(self.quantization_calibrate, None):
                set_without.append("quantization_calibrate")
            if set_without:
                raise ValueError(f"{', '.join(set_without)} set without quantization; set quantization=fp8|int8|int4")
            return
        QuantSpec(self.quantization, self.quantization_group_size, self.quantization_symmetric,
                  calibrate=self.quantization_calibrate)  # checks the values
        if self.quantization_skip is not None:
            from nanovllm.ops.resolver import parse_layers

            skip = self.quantization_skip
            self.quantization_skip = ",".join(map(str, skip)) if isinstance(skip, (list, tuple)) else str(skip)
            parse_layers(self.quantization_skip, 1 << 20, key="quantization_skip")  # the form; indices at load

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; valid: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)


# ---- Hydra schema of `python -m nanovllm.run` (configs/config.yaml) ------------------------------------
# Engine args that live at the top level of the run config (device, dtype), in the model node (model.name,
# model.revision) or in their own node (kernels) are left out of EngineArgs, which is derived from EngineConfig.
RUN_TOP_LEVEL_ENGINE_ARGS = ("model", "revision", "device", "dtype", "kernels")


@dataclass
class ModelSchema:
    name: str = "default"           # a catalog name ("default": Qwen3-0.6B, random weights), a local Hugging Face
                                    # folder, a .gguf file or a Hugging Face repo id (org/name, downloaded once)
    revision: str | None = None     # the repo's branch, tag or commit (None: its default branch)
    chat_template: bool = False     # wrap the demo prompts in the tokenizer's chat template


def _engine_args():
    """EngineConfig's fields minus the run config's top-level ones, same types and defaults: one source."""
    import typing
    from dataclasses import make_dataclass

    hints = typing.get_type_hints(EngineConfig)
    def default(f):
        return field(default=f.default) if f.default is not MISSING else field(default_factory=f.default_factory)

    return make_dataclass("EngineArgs", [(f.name, hints[f.name], default(f)) for f in fields(EngineConfig)
                                         if f.name not in RUN_TOP_LEVEL_ENGINE_ARGS])


EngineArgs = _engine_args()


@dataclass
class BenchSizes:
    num_prompts: int = 8            # demo generation: how many built-in prompts
    max_tokens: int = 64            # demo generation: new tokens per prompt
    decode_tokens: int = 256        # batch-1 decode benchmark: new tokens measured
    prefill_len: int = 1024         # prompt tokens of the prefill (TTFT) measure
    warmup: int = 2                 # untimed runs before measuring
    repeats: int = 3                # timed prefill runs (median)


@dataclass
class BenchSchema:
    # None: take the size from `cpu` or `gpu` below, by the device the engine resolved.
    num_prompts: int | None = None
    max_tokens: int | None = None
    decode_tokens: int | None = None
    prefill_len: int | None = None
    warmup: int | None = None
    repeats: int | None = None
    temperature: float = 0.0        # demo generation sampling (0: greedy)
    gpu: BenchSizes = field(default_factory=BenchSizes)
    cpu: BenchSizes = field(default_factory=BenchSizes)


@dataclass
class OutputSchema:
    results_file: str = "results.json"  # written into the Hydra run dir
    show_chars: int = 60                # prompt/completion characters printed per demo line


@dataclass
class RunConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    engine: EngineArgs = field(default_factory=EngineArgs)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    device: str = "auto"            # auto | cpu | cuda | cuda:N  (auto: cuda when available)
    dtype: str = "auto"             # auto: bfloat16 on GPU, float32 on CPU
    bench: BenchSchema = field(default_factory=BenchSchema)
    output: OutputSchema = field(default_factory=OutputSchema)


RUN_SCHEMA_NAME = "nanovllm_run_schema"


def run_schema():
    """The schema as an OmegaConf node. kernels.ops and kernels.layers stay open so that plain overrides
    such as `kernels.ops.rms_norm=compile` can add keys (Hydra only lets `+key=` add to struct nodes);
    op and backend names are checked against the registry instead (`check_kernel_names`)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(node.kernels.ops, False)
    OmegaConf.set_struct(node.kernels.layers, False)
    OmegaConf.set_struct(node.kernels.groups, False)
    return node


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore; configs/config.yaml extends it in its defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=RUN_SCHEMA_NAME, node=run_schema())


def check_schema(cfg) -> None:
    """Re-check a composed config against the schema: `+engine.typo=1` slips through Hydra's compose
    (`+` opens the node) but fails here."""
    from omegaconf import OmegaConf

    OmegaConf.merge(run_schema(), OmegaConf.to_container(cfg))  # plain values: the schema checks each key


def check_kernel_names(kernels) -> None:
    """Fail before the model is built on an unknown op, backend or layer key; errors list valid names."""
    from nanovllm.ops import load_plugins
    from nanovllm.ops.resolver import validate_kernel_table

    load_plugins(kernels.get("plugin_dirs") or ())
    validate_kernel_table(kernels)


def bench_sizes(bench, device: str) -> dict[str, int]:
    """Benchmark sizes for a resolved device: a size set in `bench` wins, else the device profile's."""
    profile = bench.cpu if device == "cpu" else bench.gpu
    return {k: bench[k] if bench[k] is not None else profile[k] for k in profile}
