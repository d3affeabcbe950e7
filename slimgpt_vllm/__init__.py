"""vLLM plugin: serve SlimGPT ``hetero`` exports (per-layer widths) with ``vllm serve <folder>``.

Installed with the ``vllm`` extra (``pip install "slimgpt-service[vllm]"``, or
``pip install -e ".[vllm]"`` from a checkout), which registers :func:`register` under vLLM's
``vllm.general_plugins`` entry point; vLLM calls it in every process it starts. It registers the
``slimgpt_*`` config classes with transformers (so no ``--trust-remote-code`` is needed) and the
``SlimGPT*ForCausalLM`` architectures with vLLM's model registry (lazily: the model module and
vLLM's layers are imported only when such a checkpoint is loaded).

``uniform`` exports are plain Llama/Mistral/Qwen2 checkpoints and need no plugin.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "register"]

#: Architectures (``config.json`` ``architectures``) the plugin serves.
ARCHITECTURES: tuple[str, ...] = (
    "SlimGPTLlamaForCausalLM",
    "SlimGPTMistralForCausalLM",
    "SlimGPTQwen2ForCausalLM",
)
_MODEL_CLASS = "slimgpt_vllm.model:SlimGPTForCausalLM"


def _register_configs() -> None:
    from transformers import AutoConfig

    from slimgpt_core.modeling_slimgpt import hetero_classes

    for arch in ARCHITECTURES:  # SlimGPT<Base>ForCausalLM
        config_cls, _ = hetero_classes(arch.removeprefix("SlimGPT").removesuffix("ForCausalLM")
                                       .lower())
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)


def register() -> None:
    """vLLM ``general_plugins`` entry point; safe to call more than once."""
    from vllm import ModelRegistry

    _register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, _MODEL_CLASS)
