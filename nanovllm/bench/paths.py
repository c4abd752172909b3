"""paths: every execution path's teacher-forced logits against transformers on the same weights.

Each path is a kernel preset plus engine overrides, composed as `python -m nanovllm.run` composes them. For every
dtype, the reference is transformers in float32 on the CPU (it shares no code with the paths it checks); each path
is also compared with the first path of its dtype (eager, no CUDA graphs) and its greedy generations with that
path's. In bfloat16 transformers itself in bfloat16 is added as the floor any bf16 path can reach: random weights
give flat logits, whose near-ties bf16 rounding decides, so "beyond ties" also counts a position as agreeing when
the path's token trails the reference's top logit by at most three times the path's own RMS error there.

A preset whose backends the device lacks falls back to the native ops (kernels.allow_fallback), so the same
list runs on a CPU.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

# name -> (preset, engine overrides); the first path of a dtype is the eager reference of that dtype
PATHS = {
    "eager": ("baseline", ("engine.enforce_eager=true",)),
    "graphs": ("baseline", ()),
    "compile": ("compile", ()),
    "sdpa": ("sdpa", ()),
    "all_fused": ("all_fused", ()),
    "fi_attn": ("fi_attn", ()),
    "flashinfer": ("flashinfer", ()),
}
DTYPE_PATHS = {"float32": ("eager", "graphs", "sdpa", "all_fused"),
               "bfloat16": ("eager", "graphs", "compile", "sdpa", "all_fused", "fi_attn", "flashinfer")}
PROMPT_TOKENS = 50
TEXT = ("The history of computing is a story of machines that became smaller, faster and cheaper, and of the "
        "people who learned to program them. Early computers filled whole rooms and were programmed by "
        "rewiring panels; later machines read their programs from punched cards, then from magnetic tape and "
        "disks. Each generation made the previous one look slow, and each brought new languages, new tools "
        "and new ideas about what a computer is for. ") * 12
ENGINE = ("engine.max_model_len=1024", "engine.max_num_seqs=8", "engine.enable_prefix_caching=false")


def argmax_agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(exact, beyond ties): the share of positions where the path's top token is the reference's, and where it
    is or trails the reference's top logit by at most three times the path's RMS error at that position."""
    pick = logits.argmax(-1)
    exact = pick == ref.argmax(-1)
    gap = ref.max(-1).values - ref.gather(-1, pick[:, None])[:, 0]
    noise = (logits - ref).pow(2).mean(-1).sqrt()
    return exact.float().mean().item(), (exact | (gap <= 3 * noise)).float().mean().item()


def row(dtype: str, name: str, logits: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, greedy_equal) -> dict:
    exact, beyond_ties = argmax_agreement(logits, ref)
    return dict(dtype=dtype, path=name, rel_err_vs_hf=((logits - ref).norm() / ref.norm()).item(),
                argmax_agree_vs_hf=exact, argmax_agree_beyond_ties=beyond_ties,
                rel_err_vs_eager=((logits - eager).norm() / eager.norm()).item(),
                argmax_agree_vs_eager=argmax_agreement(logits, eager)[0], greedy_equal_eager=greedy_equal)


def hf_logits(path: str, ids: list[int], start: int, dtype=torch.float32, device: str = "cpu") -> torch.Tensor:
    """transformers' logits at positions start-1 .. len(ids)-1 (float32, on the CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device)).logits[0, start - 1:].float().cpu()
    del model
    return out


def check(overrides: tuple[str, ...], positions: int, dtypes: dict[str, tuple[str, ...]] = DTYPE_PATHS,
          text: str = TEXT, report=print) -> list[dict]:
    """One row per (dtype, path), or a row with `error` for a path that raised; `report` sees each as it comes
    (a run cut off by a time limit still shows what it checked). `text` must give PROMPT_TOKENS + `positions`
    tokens."""
    from nanovllm import SamplingParams
    from nanovllm.bench import presets
    from nanovllm.engine.teacher_forcing import teacher_forced_logits

    rows: list[dict] = []
    ref = prompt = forced = None
    for dtype, names in dtypes.items():
        greedy_ref = eager = None
        for name in names:
            preset, engine = PATHS[name]
            llm = None
            try:
                cfg = presets.compose_config(preset, presets.merge_overrides(
                    (*ENGINE, *engine), (*overrides, f"dtype={dtype}")))
                llm = presets.build_llm(cfg)
                if ref is None:
                    ids = llm.tokenizer(text)["input_ids"]
                    if len(ids) < PROMPT_TOKENS + positions:
                        raise ValueError(f"the text has {len(ids)} tokens; {PROMPT_TOKENS} + {positions} needed")
                    prompt, forced = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:PROMPT_TOKENS + positions]
                    ref = hf_logits(llm.model_info["path"], prompt + forced, len(prompt))
                logits = teacher_forced_logits(llm.engine, prompt, forced)
                greedy = [g["token_ids"] for g in llm.generate(
                    [prompt, prompt[:7], prompt[:31]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
                greedy_ref = greedy_ref or greedy
                eager = logits if eager is None else eager
                rows.append(row(dtype, name, logits, ref, eager, greedy == greedy_ref))
                report(rows[-1])
                if dtype == "bfloat16" and eager is logits:
                    hf16 = hf_logits(llm.model_info["path"], prompt + forced, len(prompt), torch.bfloat16,
                                     llm.config.device)
                    rows.append(row(dtype, "transformers_bf16", hf16, ref, eager, None))
                    report(rows[-1])
            except Exception:
                rows.append(dict(dtype=dtype, path=name, error=traceback.format_exc()))
                report(rows[-1])
            finally:
                presets.release(llm)
    return rows


def describe(r: dict) -> str:
    if "error" in r:
        return f"{r['dtype']:9s} {r['path']:18s} ERROR {r['error'].strip().splitlines()[-1]}"
    return (f"{r['dtype']:9s} {r['path']:18s} rel_err {r['rel_err_vs_hf']:.2e} argmax {r['argmax_agree_vs_hf']:.3f} "
            f"(beyond ties {r['argmax_agree_beyond_ties']:.3f}) vs eager: rel_err {r['rel_err_vs_eager']:.2e} "
            f"argmax {r['argmax_agree_vs_eager']:.3f} greedy==eager {r['greedy_equal_eager']}")


def select(names: tuple[str, ...] | None, dtypes: tuple[str, ...] | None) -> dict[str, tuple[str, ...]]:
    """DTYPE_PATHS limited to the given paths and dtypes; ValueError naming the valid ones on a typo."""
    unknown = set(names or ()) - set(PATHS) | set(dtypes or ()) - set(DTYPE_PATHS)
    if unknown:
        raise ValueError(f"unknown path or dtype {sorted(unknown)}; paths: {', '.join(PATHS)}; "
                         f"dtypes: {', '.join(DTYPE_PATHS)}")
    out = {}
    for dtype, paths in DTYPE_PATHS.items():
        if dtypes and dtype not in dtypes:
            continue
        chosen = tuple(p for p in paths if names is None or p in names or p == paths[0])  # keep the reference
        out[dtype] = chosen
    return out


def out_path(out_dir: Path, gpu: str) -> Path:
    from nanovllm.bench.results import slug

    return Path(out_dir) / f"paths_{slug(gpu)}.json"
