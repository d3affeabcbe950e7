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


FAMILY = Olmo2()
