"""What a model family is to SlimGPT: one small adapter, torch-free at import.

A family says
  * which ``config.json`` it reads (``model_types``, GGUF architectures) and the parameter
    arithmetic of its layers (:meth:`Family.shape_fields`, used by the torch-free estimate);
  * where its projections are and what is sliced alongside them (:class:`Layout`: separate or
    fused q/k/v, per-head or whole-projection q/k norms, gated or fused gate/up FFN), which the
    compaction, the ``hetero`` modeling file and its ``config.json`` all read;
  * how one decoder layer splits into its two residual branches (the norms around attention
    and FFN, residual scaling), so the pruner can collect the Hessians between them;
  * which stock transformers classes load a ``uniform`` export.

Heads map to ``o_proj`` columns the same way in every family here (head ``h`` owns columns
``h*head_dim .. (h+1)*head_dim``), so :mod:`slimgpt_core.heads` needs no adapter.
The module-touching methods only call submodules, so this file needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

#: ``Layout.qkv``
QKV_LAYOUTS = ("separate", "fused")
#: ``Layout.head_norm``
HEAD_NORMS = ("none", "per_head", "projection")
#: ``Layout.ffn``
FFN_LAYOUTS = ("gated", "fused", "experts")


@dataclass(frozen=True)
class Layout:
    """Where the prunable rows and columns live in one decoder layer.

    qkv: ``separate`` = ``q_proj``/``k_proj``/``v_proj``; ``fused`` = one ``qkv_proj`` whose
        rows are ``[q heads | k heads | v heads]`` (Phi-3).
    head_norm: ``none``; ``per_head`` = ``q_norm``/``k_norm`` of size ``head_dim`` applied to
        every head (shared weights, never sliced: Qwen3, Gemma 3); ``projection`` = norms over
        the whole projection, ``heads*head_dim`` wide, sliced with the heads (OLMo-2).
    ffn: ``gated`` = ``gate_proj``/``up_proj``/``down_proj``; ``fused`` = one ``gate_up_proj``
        whose rows are ``[gate | up]`` and ``down_proj`` (Phi-3); ``experts`` = a routed
        mixture of experts stored as transformers 5.x fused 3-D parameters,
        ``mlp.experts.gate_up_proj`` ``[E, 2F, D]`` (per expert ``[gate | up]``) and
        ``mlp.experts.down_proj`` ``[E, D, F]``, behind the router ``mlp.gate`` (Mixtral,
        Qwen3-MoE; :mod:`slimgpt_core.families._moe`).
    """

    qkv: str = "separate"
    head_norm: str = "none"
    ffn: str = "gated"

    def __post_init__(self) -> None:
        for name, allowed in (("qkv", QKV_LAYOUTS), ("head_norm", HEAD_NORMS),
                              ("ffn", FFN_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Layout.{name} must be one of {allowed}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward."""


class Family:
    """The adapter base class; its defaults describe a Llama layer. Subclass per family."""

    #: Short name, shown to users in the supported list.
    name: ClassVar[str] = ""
    #: ``config.json`` ``model_type`` values this adapter prunes.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``general.architecture`` of GGUF files transformers loads into these model types.
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    #: The stock transformers classes of the dense (and ``uniform``-pruned) model.
    stock_config: ClassVar[str] = ""
    stock_model: ClassVar[str] = ""
    layout: ClassVar[Layout] = Layout()
    #: Decoder-layer attributes of the norms around each residual branch (None: no norm there).
    attn_in_norm: ClassVar[str | None] = "input_layernorm"
    attn_out_norm: ClassVar[str | None] = None
    ffn_in_norm: ClassVar[str | None] = "post_attention_layernorm"
    ffn_out_norm: ClassVar[str | None] = None
    #: The stock config refuses ``hidden_size % num_attention_heads != 0`` even with an
    #: explicit ``head_dim``, so a ``uniform`` export must keep head counts that divide it.
    heads_divide_hidden: ClassVar[bool] = False
    #: The ``config.json`` key of the FFN width that pruning narrows (a ``uniform`` export
    #: writes the kept width there; Qwen3-MoE's experts use ``moe_intermediate_size``).
    ffn_width_key: ClassVar[str] = "intermediate_size"
    #: Values the stock config class uses when ``config.json`` leaves a key out.
    config_defaults: ClassVar[Mapping[str, Any]] = {}
    #: Why the vLLM plugin (``slimgpt_vllm``) does not serve this family's ``hetero`` exports;
    #: None when it does. The plugin refuses such a checkpoint with it; the model card says it.
    vllm_hetero_refusal: ClassVar[str | None] = None

    # -- torch-free: config -> the numbers the plan needs ---------------------------------------
    def get(self, config: Mapping[str, Any], key: str, default: Any = None) -> Any:
        value = config.get(key)
        if value is None:
            value = self.config_defaults.get(key, default)
        return value

    def check_supported(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`~slimgpt_core.schedule.PlanError` for a variant of this family that
        the adapter refuses (the worker calls this right after reading ``config.json``)."""

    def shape_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of :class:`~slimgpt_core.schedule.ModelShape` for ``config``.

        Raises ``KeyError`` for a missing required key and ``ValueError``/``TypeError`` for a
        malformed one (the caller turns both into a clear error).
        """
        self.check_supported(config)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        bias = bool(self.get(config, "attention_bias", False))
        return {
            "num_layers": int(config["num_hidden_layers"]),
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": int(self.get(config, "num_key_value_heads") or heads),
            "head_dim": int(self.get(config, "head_dim") or hidden // heads),
            "intermediate_size": int(config[self.ffn_width_key]),
            "vocab_size": int(config["vocab_size"]),
            "tie_word_embeddings": bool(self.get(config, "tie_word_embeddings", False)),
            "qkv_bias": bias,
            "o_bias": bias,
            "mlp_bias": bool(self.get(config, "mlp_bias", False)),
            "layer_norms": self.layer_norm_count,
            "head_norm": self.layout.head_norm,
            "heads_divide_hidden": self.heads_divide_hidden,
            "model_type": str(config.get("model_type") or self.model_types[0]),
        }

    @property
    def layer_norm_count(self) -> int:
        """Hidden-size norms in one decoder layer."""
        return sum(n is not None for n in (self.attn_in_norm, self.attn_out_norm,
                                          self.ffn_in_norm, self.ffn_out_norm))

    # -- modules (duck-typed: no torch needed) --------------------------------------------------
    def decoder_layers(self, model: Any) -> Any:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise TypeError(f"{type(model).__name__} has no model.layers; not a {self.name} "
                            "causal LM")
        return layers

    def o_proj(self, layer: Any) -> Any:
        """The attention output projection, whose columns are grouped per head."""
        return layer.self_attn.o_proj

    def down_proj(self, layer: Any) -> Any:
        """The FFN output projection, one column per channel."""
        return layer.mlp.down_proj

    def ffn_width(self, layer: Any) -> int:
        """FFN channels ``layer`` has now (per expert in a mixture of experts)."""
        return int(self.down_proj(layer).in_features)

    def widths(self, layer: Any) -> tuple[int, int, int]:
        """``(query heads, KV heads, FFN channels)`` that ``layer``'s modules have now."""
        attn = layer.self_attn
        d = attn.head_dim
        heads = self.o_proj(layer).in_features // d
        if self.layout.qkv == "fused":
            kv = (attn.qkv_proj.out_features - heads * d) // (2 * d)
        else:
            kv = attn.k_proj.out_features // d
        return heads, kv, self.ffn_width(layer)

    def residual_scale(self, layer: Any) -> float:
        """Factor on each branch's output before it joins the residual stream."""
        return 1.0

    def _norm(self, layer: Any, name: str | None, x: Any) -> Any:
        return x if name is None else getattr(layer, name)(x)

    def attention_block(self, layer: Any, x: Any, ctx: Any) -> Any:
        """The residual stream after the attention branch of ``layer``."""
        out = layer.self_attn(
            hidden_states=self._norm(layer, self.attn_in_norm, x),
            position_embeddings=ctx.position_embeddings,
            attention_mask=ctx.attention_mask,
        )[0]
        out = self._norm(layer, self.attn_out_norm, out)
        scale = self.residual_scale(layer)
        return x + (out if scale == 1.0 else out * scale)

    def ffn_input(self, layer: Any, h: Any) -> Any:
        """What the FFN module receives: the normed residual stream."""
        return self._norm(layer, self.ffn_in_norm, h)

    def ffn_block(self, layer: Any, h: Any) -> Any:
        """The layer's output: ``h`` plus the FFN branch."""
        out = self._norm(layer, self.ffn_out_norm, layer.mlp(self.ffn_input(layer, h)))
        scale = self.residual_scale(layer)
        return h + (out if scale == 1.0 else out * scale)

    def ffn_hidden(self, layer: Any, h: Any) -> Any:
        """The input of ``down_proj`` for residual stream ``h`` (what its Hessian is made of).

        The FFN runs as its own module does (gated, fused, any activation) up to
        ``down_proj``, where a hook takes the input and stops the forward.
        """
        captured: list[Any] = []

        def grab(_module: Any, args: tuple[Any, ...]) -> None:
            captured.append(args[0])
            raise _StopForward

        handle = self.down_proj(layer).register_forward_pre_hook(grab)
        try:
            layer.mlp(self.ffn_input(layer, h))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{self.name}: the FFN forward never reached down_proj")
        return captured[0]

    def __repr__(self) -> str:
        return f"<family {self.name}>"
