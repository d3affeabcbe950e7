"""vLLM plugin: serve SlimGPT ``hetero`` exports (per-layer widths) with ``vllm serve <folder>``.

Installed with the ``vllm`` extra (``pip install "slimgpt-service[vllm]"``, or
``pip install -e ".[vllm]"`` from a checkout), which registers :func:`register` under vLLM's
``vllm.general_plugins`` entry point; vLLM calls it in every process it starts. It registers the
``slimgpt_*`` config classes with transformers (so no ``--trust-remote-code`` is needed) and the
``SlimGPT*ForCausalLM`` architectures with vLLM's model registry (lazily: a family's module and
vLLM's layers are imported only when such a checkpoint is loaded).

One module per family of vLLM layers, each a decoder-layer subclass of vLLM's own layer for
that family plus a model subclass (:mod:`slimgpt_vllm.base` holds what they share):
:mod:`~slimgpt_vllm.model` (vLLM's Llama layer: Llama, Mistral, Qwen2, Phi-3),
:mod:`~slimgpt_vllm.qwen3`, :mod:`~slimgpt_vllm.granite`, :mod:`~slimgpt_vllm.gemma` (Gemma 2
and 3). ``uniform`` exports are plain checkpoints of their family and need no plugin.
"""

from __future__ import annotations

from typing import Any

from slimgpt_core.families import all_families  # torch-free: the adapters say what is refused

__all__ = ["ARCHITECTURES", "REFUSED", "SERVED", "refusal", "register"]

#: Architecture (``config.json`` ``architectures``) -> (base ``model_type``, vLLM model class).
SERVED: dict[str, tuple[str, str]] = {
    "SlimGPTLlamaForCausalLM": ("llama", "slimgpt_vllm.model:SlimGPTForCausalLM"),
    "SlimGPTMistralForCausalLM": ("mistral", "slimgpt_vllm.model:SlimGPTForCausalLM"),
    "SlimGPTQwen2ForCausalLM": ("qwen2", "slimgpt_vllm.model:SlimGPTForCausalLM"),
    "SlimGPTPhi3ForCausalLM": ("phi3", "slimgpt_vllm.model:SlimGPTPhi3ForCausalLM"),
    "SlimGPTQwen3ForCausalLM": ("qwen3", "slimgpt_vllm.qwen3:SlimGPTQwen3ForCausalLM"),
    "SlimGPTGraniteForCausalLM": ("granite", "slimgpt_vllm.granite:SlimGPTGraniteForCausalLM"),
    "SlimGPTGemma2ForCausalLM": ("gemma2", "slimgpt_vllm.gemma:SlimGPTGemma2ForCausalLM"),
    "SlimGPTGemma3ForCausalLM": ("gemma3_text", "slimgpt_vllm.gemma:SlimGPTGemma3ForCausalLM"),
}
#: Architectures the plugin serves.
ARCHITECTURES: tuple[str, ...] = tuple(SERVED)


def _refused() -> dict[str, tuple[str, str]]:
    return {f"SlimGPT{f.stock_model}": (f.model_types[0], f.vllm_hetero_refusal)
            for f in all_families() if f.vllm_hetero_refusal}


#: Architecture -> (base ``model_type``, why the plugin does not serve it): the families whose
#: adapter has a ``vllm_hetero_refusal`` (OLMo-2).
REFUSED: dict[str, tuple[str, str]] = _refused()
_REFUSED_CLASS = "slimgpt_vllm.refused:SlimGPTRefusedForCausalLM"


def refusal(config: Any) -> str:
    """Why a checkpoint of a refused architecture is not served."""
    for arch in getattr(config, "architectures", None) or ():
        if arch in REFUSED:
            return (f"{arch} checkpoints are not served by the SlimGPT vLLM plugin: "
                    f"{REFUSED[arch][1]}")
    return f"slimgpt_vllm does not serve {getattr(config, 'model_type', None)!r} checkpoints"


def _register_configs() -> None:
    from transformers import AutoConfig

    from slimgpt_core.modeling_slimgpt import hetero_classes

    for base, _ in SERVED.values():
        config_cls, _ = hetero_classes(base)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    for base, _ in REFUSED.values():
        # Only so that the refusal, not a config error, is what vLLM reports; a family that
        # the transformers vLLM pins does not know must not stop every other model loading.
        try:
            config_cls, _ = hetero_classes(base)
        except (KeyError, AttributeError):
            continue
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)


def register() -> None:
    """vLLM ``general_plugins`` entry point; safe to call more than once."""
    from vllm import ModelRegistry

    _register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    models = {**{a: cls for a, (_, cls) in SERVED.items()},
              **dict.fromkeys(REFUSED, _REFUSED_CLASS)}
    for arch, model_class in models.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, model_class)
