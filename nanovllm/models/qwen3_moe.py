"""Qwen3-MoE: Qwen3's attention with a sparse MoE block (top-k softmax router, `norm_topk_prob`) on the
layers that `decoder_sparse_step` and `mlp_only_layers` select; the others keep a dense MLP."""

from nanovllm.models.dense import DenseArgs, DenseCausalLM


def build(hf_config, resolver):
    c = hf_config
    step, dense_only = getattr(c, "decoder_sparse_step", 1) or 1, set(getattr(c, "mlp_only_layers", []) or [])
    moe = tuple(c.num_experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(c.num_hidden_layers))
    args = DenseArgs.from_hf(c, qk_norm=True, qkv_bias=bool(getattr(c, "attention_bias", False)),
                             num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                             moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
                             moe_layers=moe)
    return DenseCausalLM(args, resolver, c)
