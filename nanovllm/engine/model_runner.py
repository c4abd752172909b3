"""Owns the model and its KV cache on the device; turns a scheduled batch into input tensors and
sampled tokens."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time

import numpy as np
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.kv_scales import choose_scales
from nanovllm.engine.logits_processing import LogitsAdjustment, adjusts_logits
from nanovllm.engine.memory_report import MemoryReport
from nanovllm.engine.prompt_logprobs import record_prompt_logprobs
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_mode import FILTERED, GREEDY, LOGPROBS, SAMPLED, StepMode
from nanovllm.engine.step_tokens import DeferredTokens, PendingTokens, ReadyTokens
from nanovllm.engine.weight_offload import place_weights
from nanovllm.models.dense import deferred_weights
from nanovllm.models.loader import load_hf_config, load_weights
from nanovllm.models.registry import build_model, model_target
from nanovllm.ops import OpResolver, PlanContext, kv_quant
from nanovllm.ops.meta import build_metadata
from nanovllm.ops.workspace import pool as workspace_pool
from nanovllm.quant.source import weight_source
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.masks import apply_grammar_masks, to_device
from nanovllm.utils.progress import progress_bar

log = logging.getLogger("nanovllm")


def _live_matcher(seq: Sequence):
    """The grammar matcher a row is masked by: none once its sequence finished (a row launched ahead of its
    last token is sampled, then dropped when read)."""
    return None if seq.is_finished else seq.matcher


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.hf_config = load_hf_config(model_path)
        self.timings: dict[str, float] = {}
        self.workspaces = workspace_pool(self.device)  # kernel scratch: sized by the warm-up, fixed after it
        self.activation_bytes: int | None = None  # the warm-up's peak (CUDA, KV cache sized from free memory)
        t0 = time.perf_counter()
        self.weights = source = weight_source(model_path, self.hf_config, config)  # formats, tensors, quantizer
        with torch.device(self.device):
            target = dataclasses.replace(model_target(self.hf_config, self.device.type, self.dtype),
                                         kv_dtype=config.kv_cache_dtype)
            self.resolver = OpResolver(vars(config.kernels), target, self.hf_config.num_hidden_layers, source.formats)
            with deferred_weights():  # weights get memory below: on the device, or in host memory (cpu_offload_gb)
                self.model = build_model(self.hf_config, self.resolver)
        self.offloader = place_weights(self.model, config, self.device, self.dtype)
        log.info("%s", self.resolver.summary())
        for p in self.model.parameters():
            p.data = p.data.to(self.dtype)
        with progress_bar("loading weights", total=source.count()) as advance:
            load_weights(self.model, source.tensors(), self.dtype, progress=advance, quantize=source.quantize,
                         transform=source.transform)
        self.model.apply_weight_layouts(self.resolver)
        if self.offloader is not None:
            self.offloader.attach(self.model)
        self.timings["load_s"] = time.perf_counter() - t0
        self.args = a = self.model.args
        self.block_size = config.kvcache_block_size
        self.plan_context = PlanContext(
            num_qo_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, page_size=self.block_size,
            dtype=self.dtype, device=self.device, max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len, windows=tuple(sorted(set(a.sliding_window or (0,)))))
        self.plans = self.resolver.plans
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Whole-model compile: one fullgraph trace of the forward pass, registry ops included.
        self.forward = torch.compile(self.model, fullgraph=True, dynamic=True) if config.compile_model else self.model
        self.graphs = self.kv_cache = None
        # the cache's element type, and an fp8 cache's per-layer (2, kv_heads) scales (nanovllm/engine/kv_scales.py)
        self.kv_dtype = kv_quant.storage_dtype(config.kv_cache_dtype, self.dtype)
        self.kv_scales, self.kv_scales_source = None, None
        self.workspaces.attach()  # close() detaches
        try:
            if config.kv_cache_dtype == "fp8":
                self.kv_scales, self.kv_scales_source = choose_scales(self, model_path)
            self.num_blocks = self._num_kv_blocks()
            self._allocate_kv_cache()
            if self.device.type == "cuda" and not config.enforce_eager:
                self.graphs = DecodeGraphs(self, self.forward)
                with progress_bar("capturing CUDA graphs (batch size 1; the others when first needed)"):
                    self.timings["cuda_graphs_s"] = self.graphs.capture([1])
            if self.activation_bytes is not None:  # warmed up: decode steps now fit the workspaces as they are
                self.workspaces.freeze()
            self.memory = MemoryReport.of(self)
        except BaseException:  # e.g. out of memory: give the memory back, so a sweep's next job can run
            self.close()
            raise

    def ensure_graph(self, batch: list[ScheduledSeq]) -> None:
        """Capture the decode graphs a batch would replay if its size has none yet, so each batch size costs
        its capture once, when first needed. Call it with no step in flight (capture fills both step buffers)."""
        g = self.graphs
        if g is None or not batch or len(batch) > g.max_bs or not all(
                item.num_new_tokens == 1 and item.completes for item in batch):
            return
        b = next(s for s in g.sizes if s >= len(batch))
        if not g.captured(b):
            log.info("captured the decode graphs of batch size %d in %.2f s", b, g.capture([b]))

    def capture_all_graphs(self) -> None:
        """Capture every decode batch size now (a server before its first client, a benchmark before its clock)."""
        g = self.graphs
        if g is not None and len(g.ready) < len(g.sizes):
            with progress_bar(f"capturing CUDA graphs ({len(g.sizes) - len(g.ready)} more batch sizes)"):
                self.timings["cuda_graphs_s"] = self.timings.get("cuda_graphs_s", 0.0) + g.capture()

    def close(self) -> None:
        if self.model is None:
            return
        self.graphs = None
        for layer in self.model.layers:
            layer.k_cache = layer.v_cache = None
        self.model = self.kv_cache = self.forward = self.offloader = None
        self.workspaces.detach()
        gc.collect()  # graphs, wrappers and modules can sit in reference cycles; their pools only go once collected
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.num_layers * a.num_kv_heads * a.head_dim * self.kv_dtype.itemsize

    @property
    def kv_cache_summary(self) -> str:
        """The cache's dtype, size and (fp8) where its scales came from, for logs and the run's output."""
        name = str(self.kv_dtype).removeprefix("torch.")
        scales = f"; scales per KV head {self.kv_scales_source}" if self.kv_scales is not None else ""
        return (f"KV cache: {self.config.kv_cache_dtype} ({name}), {self.num_blocks} blocks of {self.block_size} "
                f"tokens, {self.kv_bytes_per_token} bytes/token, "
                f"{self.num_blocks * self.block_size * self.kv_bytes_per_token / 2**30:.3f} GiB{scales}")

    def _num_kv_blocks(self) -> int:
        c = self.config
        if c.num_kvcache_blocks > 0:
            return c.num_kvcache_blocks
        block_bytes = self.kv_bytes_per_token * self.block_size
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            with progress_bar("warmup (largest batch, to measure activation memory)"):
                activations = self.activation_bytes = self._warmup_peak()
            self.timings["warmup_s"] = time.perf_counter() - t0
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * c.gpu_memory_utilization - (total - free) - activations
        else:
            budget = c.cpu_kvcache_gib * 2**30
        wanted = c.max_num_seqs * -(-c.max_model_len // self.block_size)
        blocks = int(min(budget // block_bytes, wanted))
        if blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
                               "lower max_num_batched_tokens or raise gpu_memory_utilization")
        return blocks

    @torch.inference_mode()
    def _warmup_peak(self) -> int:
        """Run the largest steps the engine can form over a temporary KV cache and return the activation
        memory they peaked at: a full token budget of prompts, sampling for max_num_seqs rows, and (when
        CUDA graphs are on) a decode step of the largest graph batch over full-length block tables, which is
        the shape every graph is captured at. This also runs kernel JIT and autotuning before any request."""
        c, bs = self.config, self.block_size
        seq_len = min(c.max_model_len - 1, c.max_num_batched_tokens)
        n_seqs = max(1, min(c.max_num_seqs, c.max_num_batched_tokens // seq_len))
        per_seq = -(-seq_len // bs)
        max_blocks = -(-c.max_model_len // bs)
        self.num_blocks = max(n_seqs * per_seq, max_blocks)
        self._allocate_kv_cache()
        prefill = [self._dummy(seq_len, list(range(i * per_seq, (i + 1) * per_seq)), 0) for i in range(n_seqs)]
        graph_rows = 0 if c.enforce_eager else c.max_num_seqs
        decode = [self._dummy(max_blocks * bs, list(range(max_blocks)), max_blocks * bs - 1)] * graph_rows
        # Small decode batches first: kernels that tune per row count (Triton GEMVs) tune now, while their
        # scratch memory is still free, not later during graph capture next to a full KV cache.
        for rows in sorted({1, 4, 8, 16, c.max_num_seqs} & set(range(1, c.max_num_seqs + 1))):
            step = [self._dummy(bs, [0], bs - 1)] * rows
            self.model.sample(self.hidden_states(step), *self.sampling_tensors([s.seq for s in step])[:4], None)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hidden = self.hidden_states(prefill)
        rows = hidden[:1].expand(c.max_num_seqs, -1).contiguous()
        self.model.ops.sample(self.model.compute_logits(rows), *self.sampling_tensors([prefill[0].seq] * len(rows)))
        del hidden, rows
        if decode:
            self.hidden_states(decode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        self._free_kv_cache()
        return peak

    @staticmethod
    def _dummy(num_tokens: int, block_table: list[int], computed: int) -> ScheduledSeq:
        seq = Sequence([0] * num_tokens, SamplingParams(temperature=1.0))
        seq.block_table, seq.num_computed_tokens = block_table, computed
        return ScheduledSeq(seq, num_tokens - computed)

    def _free_kv_cache(self) -> None:
        for layer in self.model.layers:
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None
        torch.cuda.empty_cache()

    def _allocate_kv_cache(self) -> None:
        a = self.args
        # One extra block at the end is a scratch target for padded slots (never handed out). Each layer's K and
        # V are tensors of their own, not views of one: torch.compile cannot write into inputs that alias each
        # other in place, and copied the whole cache per layer instead.
        shape = (self.num_blocks + 1, self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_cache = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                          torch.zeros(shape, dtype=self.kv_dtype, device=self.device)) for _ in self.model.layers]
        for i, (layer, (k, v)) in enumerate(zip(self.model.layers, self.kv_cache)):
            layer.k_cache, layer.v_cache = k, v
            layer.kv_scales = None if self.kv_scales is None else self.kv_scales[i]

    def prepare(self, batch: list[ScheduledSeq]):
        """(input ids, positions, attention metadata, rows whose logits are wanted) of an eager step."""
        seqs = [item.seq for item in batch]
        q_lens = [item.num_new_tokens for item in batch]
        seq_lens = [seq.num_computed_tokens + n for seq, n in zip(seqs, q_lens)]
        step = build_metadata([seq.block_table for seq in seqs], seq_lens, self.block_size, q_lens=q_lens)
        ids = np.fromiter(itertools.chain.from_iterable(seq.token_ids[end - n:end]
                                                        for seq, n, end in zip(seqs, q_lens, seq_lens)),
                          np.int64, int(step.cu_seqlens_q[-1]))
        rows = step.cu_seqlens_q[1:][[item.completes for item in batch]] - 1
        meta = step.to_device(self.device)
        for plan in self.plans:
            plan(meta, self.plan_context)

        def dev(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)

        return dev(ids), meta.positions, meta, dev(rows)

    def sampling_tensors(self, seqs, noise_out: torch.Tensor | None = None, draw: bool = True):
        """Per-row sampling tensors; a filter no row uses is None, so the sampler can skip it. The noise is
        drawn into `noise_out` when given (the decode graphs' buffer); without `draw`, none is (noise None)."""
        params = [s.params for s in seqs]
        dev = self.device

        def to_dev(values, dtype):  # pinned + non_blocking: a pageable copy would wait for the GPU
            return torch.tensor(values, dtype=dtype, pin_memory=dev.type == "cuda").to(dev, non_blocking=True)

        def column(values, dtype, off):
            return None if all(v == off for v in values) else to_dev(values, dtype)

        temperature = to_dev([p.temperature for p in params], torch.float32)
        top_k = column([max(p.top_k, 0) for p in params], torch.int64, 0)
        top_p = column([p.top_p for p in params], torch.float32, 1.0)
        min_p = column([p.min_p for p in params], torch.float32, 0.0)
        noise = None
        if draw and any(not p.greedy for p in params):
            noise = noise_out if noise_out is not None else self.workspaces.request(
                "sampling_noise", (len(seqs), self.args.vocab_size), torch.float32)
            self._draw_noise(seqs, noise)
        return temperature, top_k, top_p, min_p, noise

    def _draw_noise(self, seqs, noise: torch.Tensor) -> None:
        """Exponential noise for the sampler, in place: the engine's generator, then a seeded row's own."""
        noise.exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                if s.generator is None:
                    s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
                noise[i].exponential_(generator=s.generator)

    def step_mode(self, batch: list[ScheduledSeq]) -> StepMode:
        return StepMode.of(batch, self.graphs, self.config.async_scheduling)

    @torch.inference_mode()
    def hidden_states(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Final hidden state of each completing sequence (the rows whose logits are wanted)."""
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)[0]
        input_ids, positions, meta, rows = self.prepare(batch)
        hidden = self.forward(input_ids, positions, meta)
        if any(item.seq.prompt_logprobs is not None for item in batch):
            record_prompt_logprobs(batch, hidden, self.model.compute_logits)
        return hidden[rows]

    @torch.inference_mode()
    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        return self.model.compute_logits(self.hidden_states(batch))

    def launch(self, batch: list[ScheduledSeq], prev: torch.Tensor | None = None) -> PendingTokens | ReadyTokens:
        """Start a step: without waiting for it when its mode may run ahead (`launch_decode`), else run it
        through (`run`). `prev`: see launch_decode."""
        mode = self.step_mode(batch)
        if mode.run_ahead:
            return self.launch_decode(batch, prev, mode)
        if prev is not None:
            raise RuntimeError(f"a step launched on the tokens in flight cannot run ahead (mode {mode})")
        return ReadyTokens(*self.run(batch, mode))

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], mode: StepMode | None = None) -> tuple[list[int], list[dict | None]]:
        """One forward pass; returns the new token (and logprobs, if asked) of each completing sequence."""
        mode = mode or self.step_mode(batch)
        seqs = [item.seq for item in batch if item.completes]
        if mode.graph and mode.sampling != LOGPROBS:  # the graph samples; adjusted and masked rows again after it
            hidden, tokens, sampling = self._graph_decode(batch, None, mode)
            return self._resample_adjusted(tokens, hidden, seqs, mode, sampling).tolist(), [None] * len(seqs)
        hidden = self.graphs.run(batch)[0] if mode.graph else self.hidden_states(batch)
        if not seqs:
            return [], []
        if mode.sampling != LOGPROBS:
            sampling = self.sampling_tensors(seqs)
            tokens = self.model.sample(hidden, *sampling)
            return self._resample_adjusted(tokens, hidden, seqs, mode, sampling).tolist(), [None] * len(seqs)
        logits = self.model.compute_logits(hidden)
        tokens = self.model.ops.sample(self.adjusted_logits(logits, seqs), *self.sampling_tensors(seqs))
        # Logprobs are the model's own (before penalties and biases), as vLLM returns them by default.
        return tokens.tolist(), self._logprobs(logits, tokens, [s.params.logprobs for s in seqs])

    def adjusted_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logits (a row per sequence) after penalties, biases and min_tokens bans, then the grammar masks of the
        rows that follow one (the plain path's and a verify step's one-token-at-a-time rows alike)."""
        adjustment = LogitsAdjustment.of(seqs, self.args.vocab_size, self.device)
        adjusted = logits if adjustment is None else adjustment.apply(logits)
        apply_grammar_masks(adjusted, [_live_matcher(s) for s in seqs])
        return adjusted

    def _resample_adjusted(self, tokens: torch.Tensor, hidden: torch.Tensor, seqs: list[Sequence], mode: StepMode,
                           sampling) -> torch.Tensor:
        """`tokens` (every row sampled as if no logits were adjusted), with the rows whose logits are adjusted or
        masked (ADJUSTED, masked steps) sampled again from their hidden states' logits, adjusted and masked,
        under the same `sampling` tensors (per row of the batch, the noise included). The other rows keep their
        tokens: the logits of the whole batch are never formed."""
        if not mode.deferred:
            return tokens
        rows = [i for i, s in enumerate(seqs) if adjusts_logits(s) or _live_matcher(s) is not None]
        if not rows:
            return tokens
        index = to_device(torch.tensor(rows), tokens.device)
        picked = [seqs[i] for i in rows]
        logits = self.adjusted_logits(self.model.compute_logits(hidden.index_select(0, index)), picked)
        picked_sampling = [None if t is None else t.index_select(0, index) for t in sampling]
        return tokens.index_copy_(0, index, self.model.ops.sample(logits, *picked_sampling))

    @torch.inference_mode()
    def launch_decode(self, batch: list[ScheduledSeq], prev: torch.Tensor | None = None,
                      mode: StepMode | None = None) -> PendingTokens:
        """Start a decode step (no logprobs) through the CUDA graphs and return without waiting for it.
        With `prev` (device tokens of the step in flight, one per row of `batch`), the rows run one position
        ahead on those tokens (async scheduling). No host sync. A deferred step (StepMode.deferred) queues its
        forward pass and the graph's sampling now, and its adjusted and masked rows' sampling when the engine
        completes it, after reading the step before."""
        mode = mode or self.step_mode(batch)
        hidden, tokens, sampling = self._graph_decode(batch, prev, mode)
        if not mode.deferred:
            return PendingTokens(tokens, self.graphs)
        seqs = [item.seq for item in batch]
        deferred = DeferredTokens(lambda: self._resample_adjusted(tokens, hidden, seqs, mode, sampling), self.graphs)
        if prev is None:  # nothing in flight: the host already has every earlier token
            deferred.complete()
        return deferred

    def _graph_decode(self, batch: list[ScheduledSeq], prev: torch.Tensor | None, mode: StepMode):
        """(hidden states, device tokens, sampling tensors) of a decode batch through the graphs, sampled as
        `mode.sampling` says: the greedy graph, the sampled graph (temperature and noise in its buffers), the
        filtered graph (FILTERED batches that `filters_fit`: top-k, top-p and min-p in its buffers too), or for
        larger FILTERED batches the greedy graph's hidden states sampled outside it. An ADJUSTED or masked step
        samples every row so, as its `unadjusted` mode says, and returns the sampling tensors it used (the noise
        in the graphs' buffer) for _resample_adjusted; other steps return None for them. Steps replaying a
        sampling graph allocate no device memory; a workspace too small for the step raises (ops/workspace.py)."""
        g, seqs = self.graphs, [item.seq for item in batch]
        plain = mode.unadjusted([s.params for s in seqs]) if mode.deferred else mode
        noise = None if plain.sampling == GREEDY else g.noise[:len(seqs)]
        with self.workspaces.strict():
            if plain.sampling == GREEDY:
                hidden, tokens = g.run(batch, prev)
            elif plain.sampling == SAMPLED or g.filters_fit(len(seqs)):
                g.set_sampling([s.params for s in seqs], filters=plain.sampling == FILTERED)
                self._draw_noise(seqs, noise)
                hidden, tokens = g.run(batch, prev, sampled=True, filtered=plain.sampling == FILTERED)
            else:
                temperature, *filters, _ = self.sampling_tensors(seqs, noise_out=noise)
                hidden = g.run(batch, prev)[0]
                tokens = self.model.sample(hidden, temperature, *filters, noise)
        sampling = (*self.sampling_tensors(seqs, draw=False)[:4], noise) if mode.deferred else None
        return hidden, tokens, sampling

    @staticmethod
    def _logprobs(logits, tokens, want) -> list[dict | None]:
        logp = logits.float().log_softmax(dim=-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(w or 0 for w in want)
        top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
        out = []
        for i, w in enumerate(want):
            if w is None:
                out.append(None)
                continue
            top = dict(zip(top_i[i, :w].tolist(), top_v[i, :w].tolist())) if w else {}
            out.append({"token_logprob": chosen[i], "top": top})
        return out

