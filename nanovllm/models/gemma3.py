"""Gemma 3 (text): sandwich norms, (1 + w) RMSNorms made plain at load time, sqrt(hidden)-scaled
embeddings, GELU-tanh MLP, q/k norms, local (sliding, own rope base) and global layers, and the
query_pre_attn_scalar attention scale; final-logit soft-capping where the config has it."""

import logging

from nanovllm.models.dense import DenseArgs, DenseCausalLM

log = logging.getLogger("nanovllm")


class Gemma3CausalLM(DenseCausalLM):
    renames = {**DenseCausalLM.renames, "post_attention_layernorm.weight": "post_attn_norm",
               "pre_feedforward_layernorm.weight": "post_norm", "post_feedforward_layernorm.weight": "post_mlp_norm"}
    # Gemma3ForConditionalGeneration checkpoints (transformers 5 and 4.x names): text weights only
    text_prefixes = ("model.language_model.", "language_model.model.")

    def skips(self, hf_name: str) -> bool:
        return hf_name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                                   "multi_modal_projector."))

    def param_name(self, hf_name: str):
        for prefix in self.text_prefixes:
            if hf_name.startswith(prefix):
                hf_name = "model." + hf_name.removeprefix(prefix)
        return super().param_name(hf_name.replace("language_model.lm_head.", "lm_head."))


def build(hf_config, resolver):
    c = hf_config
    if getattr(c, "hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Gemma 3 with activation {c.hidden_activation!r} is not supported")
    if getattr(c, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with bidirectional attention (an encoder) is not supported")
    if getattr(c, "attn_logit_softcapping", None):
        # transformers' Gemma 3 attention never applies it (Gemma 2 did); match the reference.
        log.warning("Gemma 3: attn_logit_softcapping=%s is ignored, as transformers does", c.attn_logit_softcapping)
    args = DenseArgs.from_hf(
        c, qk_norm=True, qkv_bias=bool(getattr(c, "attention_bias", False)), activation="gelu_tanh",
        sandwich_norms=True, norm_offset=1.0, embed_scale=c.hidden_size ** 0.5,
        attn_scale=c.query_pre_attn_scalar ** -0.5, final_softcap=getattr(c, "final_logit_softcapping", None) or 0.0,
        rope_types=tuple(c.layer_types))
    return Gemma3CausalLM(args, resolver, c)
