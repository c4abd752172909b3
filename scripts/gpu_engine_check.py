"""One GPU call's worth of engine checks: CUDA-graph vs eager correctness, then batch-1 decode speed per
configuration. Prints a table last; writes JSON to --out.

python3 scripts/gpu_engine_check.py --out $OUT/engine.json [--configs eager,graphs,compile_ops,...]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.teacher_forcing import teacher_forced_logits
from nanovllm.speed import measure

CONFIGS = {
    "eager_nographs": dict(enforce_eager=True),
    "graphs": dict(),
    "graphs_compile_ops": dict(kernels={"default": "compile"}),
    "graphs_compile_model": dict(compile_model=True),
}


def preset(*names: str) -> dict:
    """The kernel table of configs/kernels presets stacked over the baseline, as `+kernels=[...]` gives."""
    from omegaconf import OmegaConf

    table = OmegaConf.create({"default": "eager", "ops": {}, "layers": {}})
    for name in names:
        table = OmegaConf.merge(table, OmegaConf.load(f"configs/kernels/{name}.yaml"))
    return OmegaConf.to_container(table)


for _name in ("sdpa", "fi_attn", "flashinfer", "fi_cascade", "all_fused"):
    CONFIGS[f"graphs_{_name}"] = dict(kernels=preset(_name))
CONFIGS["graphs_fi_attn_compile_model"] = dict(kernels=preset("fi_attn"), compile_model=True)


MODEL, DEVICE = "default", "cuda"
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt"
CHECKED = {"float32": ("eager_nographs", "graphs", "graphs_sdpa", "graphs_all_fused"),
           "bfloat16": ("eager_nographs", "graphs", "graphs_compile_ops", "graphs_sdpa", "graphs_all_fused",
                        "graphs_fi_attn", "graphs_flashinfer")}


def hf_logits(path: str, ids: list[int], start: int, dtype=torch.float32, device: str = "cpu") -> torch.Tensor:
    """The reference: on the CPU in float32 for every dtype checked (it shares nothing with the GPU paths it
    checks). In bf16 on the checked device it is the floor any bf16 path can reach against the fp32 one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device)).logits[0, start - 1:].float().cpu()
    del model
    return out


def compare(dtype: str, name: str, logits: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, greedy_equal) -> dict:
    exact, beyond_ties = argmax_agreement(logits, ref)
    return dict(dtype=dtype, config=name, rel_err_vs_hf=((logits - ref).norm() / ref.norm()).item(),
                argmax_agree_vs_hf=exact, argmax_agree_beyond_ties=beyond_ties,
                rel_err_vs_eager=((logits - eager).norm() / eager.norm()).item(),
                argmax_agree_vs_eager=argmax_agreement(logits, eager)[0], greedy_equal_eager=greedy_equal)


def argmax_agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(exact, beyond ties): the share of positions where the path's top token is the reference's, and where
    it is, or trails the reference's top logit by no more than three times the path's own RMS error there
    (random weights give flat logits: many positions have near-ties that bf16 rounding decides)."""
    pick = logits.argmax(-1)
    exact = pick == ref.argmax(-1)
    gap = ref.max(-1).values - ref.gather(-1, pick[:, None])[:, 0]
    noise = (logits - ref).pow(2).mean(-1).sqrt()
    return exact.float().mean().item(), (exact | (gap <= 3 * noise)).float().mean().item()


def correctness(positions: int) -> list[dict]:
    """Teacher-forced logits of every path against transformers on the same weights, and greedy outputs
    against the eager path, in bf16 and in fp32."""
    rows = []
    ref = prompt = forced = None
    for dtype, names in CHECKED.items():
        greedy_ref = first = None
        for name in names:
            try:
                llm = LLM(MODEL, device=DEVICE, dtype=dtype, max_model_len=1024, max_num_seqs=8,
                          enable_prefix_caching=False, **CONFIGS[name])
                if ref is None:  # English text: a real checkpoint is confident on it, random weights are not
                    ids = llm.tokenizer(TEXT.read_text())["input_ids"]
                    prompt, forced = ids[:50], ids[50:50 + positions]
                    ref = hf_logits(llm.model_info["path"], prompt + forced, len(prompt))
                logits = teacher_forced_logits(llm.engine, prompt, forced)
                greedy = [g["token_ids"] for g in llm.generate(
                    [prompt, prompt[:7], prompt[:31]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
                greedy_ref = greedy_ref or greedy
                first = logits if first is None else first  # the eager path of this dtype
                rows.append(compare(dtype, name, logits, ref, first, greedy == greedy_ref))
                print_check(rows[-1])  # as it goes: a run cut off by its time limit still reports
                if dtype == "bfloat16" and first is logits:  # transformers itself in bf16: the floor
                    hf16 = hf_logits(llm.model_info["path"], prompt + forced, len(prompt), torch.bfloat16, DEVICE)
                    rows.append(compare(dtype, "transformers_bf16", hf16, ref, first, None))
                    print_check(rows[-1])
                llm.close()
            except Exception:
                rows.append(dict(dtype=dtype, config=name, error=traceback.format_exc()))
                print(rows[-1]["error"])
                print_check(rows[-1])
    return rows


def print_check(r: dict) -> None:
    if "error" in r:
        print(f"{r['dtype']:9s} {r['config']:24s} ERROR {r['error'].splitlines()[-1]}", flush=True)
    else:
        print(f"{r['dtype']:9s} {r['config']:24s} rel_err {r['rel_err_vs_hf']:.2e} "
              f"argmax {r['argmax_agree_vs_hf']:.3f} (beyond ties {r['argmax_agree_beyond_ties']:.3f}) "
              f"vs eager: rel_err {r['rel_err_vs_eager']:.2e} argmax {r['argmax_agree_vs_eager']:.3f} "
              f"greedy==eager {r['greedy_equal_eager']}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--check", action="store_true", help="compare every path's logits with transformers first")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (use --model tiny)")
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions after a 50-token prompt")
    args = p.parse_args()
    global MODEL, DEVICE
    MODEL, DEVICE = args.model, args.device
    base = dict(max_model_len=4096, max_num_seqs=64)
    results = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    results["correctness"] = correctness(args.positions) if args.check else []
    rows = []
    for name in filter(None, args.configs.split(",")):
        t0 = time.perf_counter()
        try:
            llm = LLM(MODEL, device=DEVICE, **base, **CONFIGS[name])
            build = time.perf_counter() - t0
            speed = measure(llm, args.decode_tokens, 1024, 2, 3)
            rows.append(dict(config=name, build_s=build, timings=llm.engine.runner.timings,
                             kv_blocks=llm.engine.runner.num_blocks, **speed))
            llm.close()
        except Exception:
            rows.append(dict(config=name, error=traceback.format_exc()))
            print(rows[-1]["error"])
    results["speed"] = rows
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"{'config':24s} {'decode tok/s':>12s} {'ms/tok':>8s} {'ttft ms':>8s} {'prefill tok/s':>14s} {'build s':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:24s} ERROR {r['error'].splitlines()[-1]}")
        else:
            print(f"{r['config']:24s} {r['decode_tok_s']:12.1f} {r['decode_ms_per_token']:8.3f} {r['ttft_ms']:8.1f} "
                  f"{r['prefill_tok_s']:14.0f} {r['build_s']:8.1f}")


if __name__ == "__main__":
    main()
