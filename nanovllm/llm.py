"""The offline API, nano-vllm compatible: LLM(model).generate(prompts, sampling_params)."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.progress import progress_bar


class LLM:
    def __init__(self, model: str = "default", **engine_args):
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Free the model and KV cache now (e.g. between jobs of a sweep in one process)."""
        if self.engine is not None:
            if self.engine.speculator is not None:
                self.engine.speculator.close()
            self.engine.runner.close()
            self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------------
    def _add_all(self, prompts, sampling_params) -> list[str]:
        """Check every request before adding any, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            try:
                if not isinstance(params, SamplingParams):
                    raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
                self.engine.tokenize(prompt, params.truncate_prompt_tokens)
                self.engine.check_params(params)
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
        return [self.engine.add_request(p, sp) for p, sp in zip(prompts, sampling_params)]

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[dict]:
        """Run the requests to completion; one dict per prompt with text, token_ids and finish_reason."""
        ids = self._add_all(prompts, sampling_params)
        index = {rid: i for i, rid in enumerate(ids)}
        results = [{"text": "", "token_ids": [], "finish_reason": None} for _ in ids]
        progress = progress_bar("generating", total=len(ids)) if use_tqdm else nullcontext(lambda n=1: None)
        with progress as advance:
            for out in self._drain():
                r = results[index[out.request_id]]
                r["text"] += out.text
                r["token_ids"] += out.token_ids
                if out.logprobs:
                    r.setdefault("logprobs", []).extend(out.logprobs)
                if out.prompt_logprobs is not None:
                    r["prompt_logprobs"] = out.prompt_logprobs
                if out.finished:
                    r["finish_reason"] = out.finish_reason
                    advance()
        return results

    def stream(self, prompts, sampling_params=None) -> Iterator[dict]:
        """Yield each request's new tokens as they are produced: {index, token_ids, text, finished}."""
        ids = self._add_all(prompts, sampling_params)
        index = {rid: i for i, rid in enumerate(ids)}
        try:
            for out in self._drain():
                yield {"index": index[out.request_id], "token_ids": out.token_ids, "text": out.text,
                       "finished": out.finished, "finish_reason": out.finish_reason}
        finally:  # a consumer that stops early must not leave requests holding KV blocks
            for rid in ids:
                self.engine.abort_request(rid)

    def chat(self, messages, sampling_params=None, enable_thinking: bool = True, **kwargs) -> list[dict]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, enable_thinking) for c in convs]
        return self.generate(prompts, sampling_params, **kwargs)

    def apply_chat_template(self, messages, enable_thinking: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {self.config.model!r} has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    def _drain(self):
        while self.engine.has_unfinished():
            yield from self.engine.step()

    def capture_cuda_graphs(self) -> None:
        """Capture the decode graphs of every batch size now rather than when each is first needed."""
        self.engine.runner.capture_all_graphs()

    # -- facts for results files ----------------------------------------------------------------------
    @property
    def kernel_table(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in self.engine.runner.resolver.table.items()}

    @property
    def kernel_reasons(self) -> dict[str, str]:
        """Why an op did not get the backend asked for: `auto` passed over a faster one, or a fallback."""
        return dict(self.engine.runner.resolver.reasons)

    @property
    def kernel_summary(self) -> str:
        """One line: the backends the ops got, and why any is not the one asked for."""
        return self.engine.runner.resolver.summary()

    @property
    def device_name(self) -> str:
        dev = torch.device(self.config.device)
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        return f"cpu ({platform.processor() or platform.machine()})"

    @property
    def quantization(self) -> str:
        """How the weights are quantized: "none", "int4 (group 128, symmetric)", "gptq checkpoint" ..."""
        return self.engine.runner.weights.description

    @property
    def model_info(self) -> dict:
        from nanovllm.quant.report import weight_stats

        runner = self.engine.runner
        model, args = runner.model, runner.args
        stats = weight_stats(model)
        weight_bytes = stats["dense_bytes"] + stats["quantized_bytes"]
        if not args.tie_word_embeddings or model.lm_head is not model.embed:
            weight_bytes -= model.embed.numel() * model.embed.element_size()  # only looked up, not read whole
        path = self.engine.model_path
        readme = path / "README.md"
        return dict(name=self.config.model, path=str(path),
                    architecture=(runner.hf_config.architectures or ["?"])[0],
                    num_params=stats["num_params"], weight_bytes=weight_bytes,
                    weight_bytes_dense=stats["dense_bytes"], weight_bytes_quantized=stats["quantized_bytes"],
                    weight_bytes_unquantized=stats["dense_equivalent_bytes"], quantization=self.quantization,
                    quantized_formats=stats["formats"], kv_bytes_per_token=runner.kv_bytes_per_token,
                    kv_cache_dtype=self.config.kv_cache_dtype,
                    kv_cache_bytes=runner.num_blocks * runner.block_size * runner.kv_bytes_per_token,
                    memory=runner.memory.as_dict(),  # weights, KV, activations, workspaces: engine/memory_report.py
                    random_weights=readme.is_file() and "random" in readme.read_text().lower())
