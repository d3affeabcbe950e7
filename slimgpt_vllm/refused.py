"""Families the plugin recognises but does not serve: loading one fails with the reason.

Registering their architectures (rather than leaving vLLM to say it does not know them) turns
vLLM's list of every architecture it has into one sentence about this checkpoint.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

from slimgpt_core.served_layout import LayoutError

__all__ = ["SlimGPTRefusedForCausalLM"]


class SlimGPTRefusedForCausalLM(LlamaForCausalLM):
    """Stands in for a refused architecture (a Llama class only so vLLM's registry inspects a
    text-generation model); building it raises :class:`LayoutError` with the reason."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        from slimgpt_vllm import refusal

        raise LayoutError(refusal(vllm_config.model_config.hf_config))
