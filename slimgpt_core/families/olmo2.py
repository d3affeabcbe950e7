"""OLMo-2: norms after each branch only, and q/k norms over the whole projection.

Those norms are ``heads * head_dim`` wide, so their weights are sliced with the heads (and
their root-mean-square is over the kept heads only, which the pruner's Hessians see since it
runs the pruned modules).
"""

from __future__ import annotations

from slimgpt_core.families._base import Family, Layout


class Olmo2(Family):
    name = "olmo2"
    model_types = ("olmo2",)
    stock_config = "Olmo2Config"
    stock_model = "Olmo2ForCausalLM"
    layout = Layout(head_norm="projection")
    attn_in_norm = None
    attn_out_norm = "post_attention_layernorm"
    ffn_in_norm = None
    ffn_out_norm = "post_feedforward_layernorm"
    vllm_hetero_refusal = (
        "vLLM (0.32) has no OLMo-2 layers of its own for the SlimGPT plugin to build from (it "
        "runs OLMo-2 through its Transformers backend), and OLMo-2's q/k norms run over the "
        "whole projection, so the zero heads and KV copies that uneven (gqa_policy 'free') or "
        "tensor-parallel widths are served with would change the root-mean-square they divide "
        "by. Serve the uniform export (vLLM loads it as it is) or this one with transformers "
        "(trust_remote_code=True).")


FAMILY = Olmo2()
