"""Batch-1 decode speed of every model family against its roofline, on random weights of realistic size.

    python benchmarks/models_gpu.py                                   # on the GPU (bf16)
    python benchmarks/models_gpu.py --device cpu --scale tiny        # a smoke run anywhere

Each family gets a random-weight checkpoint shaped like a real model (SmolLM2-135M for Llama, a
Mistral-style sliding-window model, Qwen2.5-0.5B, Gemma-3-270M, a small Qwen3-MoE), written once into
--cache with a placeholder tokenizer (token ids only). Decode tok/s is the median step of a greedy
stream; the roofline is the bytes one decode step must read (the weights a token touches: for MoE only
the routed experts, plus the KV cache of the context) over the card's weight-read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMON = dict(initializer_range=0.02, max_position_embeddings=4096)
FAMILIES = {
    "llama (SmolLM2-135M)": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "mistral (sliding 512, 0.5B)": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, sliding_window=512, tie_word_embeddings=False)),
    "qwen2 (Qwen2.5-0.5B)": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "gemma3 (Gemma-3-270M)": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3-moe (1B, 32x top-8)": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32,
        num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        rope_theta=1e6, norm_topk_prob=True, tie_word_embeddings=True)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1024, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            query_pre_attn_scalar=16)


def write_placeholder_tokenizer(dest: Path, vocab: int) -> None:
    """A word-level tokenizer `<t0> <t1> ...` covering the vocabulary: enough to build the engine and
    detokenize random-weight output; prompts are passed as token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<t{vocab - 1}>").save_pretrained(str(dest))


def checkpoint(name: str, cache: Path, scale: str) -> Path:
    import transformers

    from nanovllm.checkpoints import write_random_checkpoint

    cls, arch, kw = FAMILIES[name]
    kw = {**COMMON, **kw, **(TINY if scale == "tiny" else {})}
    dest = cache / f"{scale}-{name.split()[0]}"
    if not (dest / "config.json").is_file():
        config = getattr(transformers, cls)(**kw, architectures=[arch])
        write_random_checkpoint(config, dest, seed=0, dtype=torch.bfloat16, tokenizer=False)
        write_placeholder_tokenizer(dest, config.vocab_size)
    return dest


def active_weight_bytes(llm) -> int:
    """Weight bytes one decoded token reads: every weight, except unrouted experts of MoE layers."""
    info, model = llm.model_info, llm.engine.runner.model
    total, args = info["weight_bytes"], model.args
    for layer in model.layers:
        if getattr(layer, "moe", False):
            experts = layer.experts_gate_up.nbytes + layer.experts_down.nbytes
            total -= experts * (1 - args.top_k / args.num_experts)
    return int(total)


def decode_step_s(llm, vocab: int, prompt_len: int, tokens: int, seed: int) -> float:
    """Median seconds per decoded token of one greedy request (a fresh prompt: no prefix-cache hits)."""
    from nanovllm.speed import stream_times

    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    return statistics.median(stream_times(llm, prompt, tokens)[1])


def bench(name: str, args) -> dict:
    from nanovllm import LLM
    from nanovllm.roofline import device_bandwidth, roofline_tok_s

    path = checkpoint(name, Path(args.cache), args.scale)
    kernels = json.loads(args.kernels)
    llm = LLM(str(path), device=args.device, dtype=args.dtype, max_model_len=args.prompt_len + args.tokens + 64,
              max_num_seqs=8, kernels=kernels)
    try:
        vocab = llm.engine.runner.args.vocab_size
        decode_step_s(llm, vocab, args.prompt_len, 16, seed=0)  # warmup: compile, graphs, caches
        step = decode_step_s(llm, vocab, args.prompt_len, args.tokens, seed=1)
        info, weights = llm.model_info, active_weight_bytes(llm)
        bw, source = device_bandwidth(llm.device_name, args.device)
        context = args.prompt_len + args.tokens // 2
        roof = roofline_tok_s(weights, info["kv_bytes_per_token"], context, bw)
        return dict(family=name, architecture=info["architecture"], params=info["num_params"],
                    active_weight_bytes=weights, kv_bytes_per_token=info["kv_bytes_per_token"], context=context,
                    decode_tok_s=1 / step, roofline_tok_s=roof, fraction_of_roofline=(1 / step) / roof,
                    bandwidth=bw, bandwidth_source=source, device=llm.device_name, kernels=kernels,
                    kernel_table=llm.kernel_table.get("0", {}))
    finally:
        llm.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/models_gpu.json",
                   help="results JSON (default: under the git-ignored bench-results/)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--scale", choices=("real", "tiny"), default="real", help="tiny: a CPU smoke run")
    p.add_argument("--families", default="", help="comma-separated name prefixes (default: all)")
    p.add_argument("--tokens", type=int, default=128, help="decode steps measured")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--kernels", default='{"default": "eager", "ops": {"moe": "triton"}}',
                   help="engine kernel table as JSON (allow_fallback keeps unsupported backends native)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "nanovllm" / "models_gpu"))
    args = p.parse_args(argv)
    wanted = [f for f in FAMILIES if not args.families or f.startswith(tuple(args.families.split(",")))]
    rows = []
    for name in wanted:
        rows.append(bench(name, args))
        r = rows[-1]
        print(f"{name:30s} {r['params'] / 1e6:8.1f}M {r['active_weight_bytes'] / 1e6:9.1f} MB "
              f"{r['decode_tok_s']:9.1f} tok/s  roofline {r['roofline_tok_s']:9.1f}  "
              f"({100 * r['fraction_of_roofline']:.1f}%)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(results=rows, args=vars(args)), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
