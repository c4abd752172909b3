"""Peers on the same weights, batch-1 greedy decode at one context:

- `hf_eager`: transformers `generate`; decode tok/s from the time of N new tokens minus the time of 1.
- `hf_static_compile`: gpt-fast's recipe in transformers: a StaticCache, the prompt prefilled eagerly, then a
  `decode_one_token` step compiled with torch.compile(mode="reduce-overhead", fullgraph=True) and called in a
  loop. If that fails, fall back to generate() with cache_implementation="static" and a compiled forward.

Every peer fails soft: its error string is recorded and the run goes on.
"""

from __future__ import annotations

import gc
import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def load(path: str, device, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


def prompt(path: str, context: int, device) -> torch.Tensor:
    """The same kind of prompt the latency benchmark uses: `context` tokens of plain text."""
    from transformers import AutoTokenizer

    from nanovllm.speed import prompt_ids

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return torch.tensor([prompt_ids(tok, context, tag=7)], device=device)


@torch.no_grad()
def _generate_s(model, ids, n: int, repeats: int = 2) -> float:
    """Best-of-`repeats` seconds of a greedy generate() of exactly n new tokens."""
    best = float("inf")
    for _ in range(repeats):
        _sync(ids.device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(ids.device)
        best = min(best, time.perf_counter() - t0)
    return best


def _n_vs_1(model, ids, new_tokens: int) -> dict:
    _generate_s(model, ids, 2, repeats=1)  # warm up (and compile, for a compiled forward)
    one, many = _generate_s(model, ids, 1), _generate_s(model, ids, new_tokens)
    return dict(decode_tok_s=(new_tokens - 1) / (many - one), t_1_s=one, t_n_s=many, new_tokens=new_tokens)


def hf_eager(model, ids, new_tokens: int) -> dict:
    return dict(_n_vs_1(model, ids, new_tokens), method="generate, N tokens vs 1")


def cache_kwarg(model) -> str:
    """transformers 5.x before 5.24 names the cache argument `past_key_values`; later ones `cache`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_one_token(model, cur_token, input_pos, cache, cache_arg: str = "past_key_values"):
    """One greedy decode step over a static cache: the function gpt-fast compiles."""
    logits = model(input_ids=cur_token, position_ids=input_pos, use_cache=True, **{cache_arg: cache}).logits
    return torch.argmax(logits[:, -1], dim=-1, keepdim=True)


def _compile(fn, backend: str, fullgraph: bool = True):
    if backend == "inductor":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=fullgraph)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph)  # CPU smoke runs: trace only, no codegen


@torch.no_grad()  # as gpt-fast and generate() run it (inference tensors add nothing here)
def static_compiled_loop(model, ids, new_tokens: int, backend: str = "inductor", warmup: int = 4) -> dict:
    from transformers import StaticCache

    device, n_prompt = ids.device, ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n_prompt + warmup + new_tokens + 1)
    # Prefill eagerly: it lays the cache out (static addresses) and gives the first token.
    arg = cache_kwarg(model)
    positions = torch.arange(n_prompt, device=device).unsqueeze(0)
    logits = model(input_ids=ids, position_ids=positions, use_cache=True, **{arg: cache}).logits
    token = torch.argmax(logits[:, -1], dim=-1, keepdim=True)
    input_pos = torch.tensor([[n_prompt]], device=device)
    step = _compile(decode_one_token, backend)

    def run(n: int):
        nonlocal token
        for _ in range(n):
            # clone: a CUDA-graph replay overwrites its outputs on the next replay
            token = step(model, token, input_pos, cache, arg).clone()
            input_pos.add_(1)

    t0 = time.perf_counter()
    run(warmup)  # compile, then CUDA-graph recording on the following calls
    _sync(device)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(new_tokens)
    _sync(device)
    wall = time.perf_counter() - t0
    return dict(decode_tok_s=new_tokens / wall, compile_s=compile_s, new_tokens=new_tokens, backend=backend,
                method="StaticCache + compiled decode_one_token loop (gpt-fast recipe)")


def static_generate(model, ids, new_tokens: int, backend: str = "inductor") -> dict:
    """Fallback: generate() with a static cache and a compiled forward (auto-compile off, we compile)."""
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True
    model.forward = _compile(model.forward, backend)
    return dict(_n_vs_1(model, ids, new_tokens), backend=backend,
                method="generate, cache_implementation=static, compiled forward, N tokens vs 1")


def run(path: str, device, dtype, context: int = 128, eager_tokens: int = 32, compiled_tokens: int = 128,
        backend: str = "inductor", time_left=None) -> tuple[dict, dict]:
    """({name: decode tok/s or None}, {name: details or {"error": ...}}). The peers share one loaded model;
    a failed attempt reloads it, since a half-done compile may have patched it."""
    rates, details = {}, {}
    attempts = {
        "hf_eager": [lambda m, ids: hf_eager(m, ids, eager_tokens)],
        "hf_static_compile": [lambda m, ids: static_compiled_loop(m, ids, compiled_tokens, backend),
                              lambda m, ids: static_generate(m, ids, compiled_tokens, backend)],
    }
    model = ids = None
    for name, tries in attempts.items():
        rates[name], errors = None, []
        if time_left is not None and time_left() <= 0:
            details[name] = dict(error="skipped: time budget spent")
            continue
        for attempt in tries:
            try:
                model = load(path, device, dtype) if model is None else model
                ids = prompt(path, context, device) if ids is None else ids
                details[name] = dict(attempt(model, ids), context=context, errors_before=errors)
                rates[name] = details[name]["decode_tok_s"]
                break
            except Exception as e:  # a peer's failure is a result, not a crash
                errors.append(f"{type(e).__name__}: {str(e)[:500]}")
                model = None
                _free()
        if rates[name] is None:
            details[name] = dict(error=" | ".join(errors), context=context)
    del model
    _free()
    return rates, details


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # drop compiled code (and its CUDA-graph pools) that holds the model
