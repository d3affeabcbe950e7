"""Which model shapes preset ``thorough`` (allocation search) runs on this device: the check a
worker makes before calibrating (:func:`slimgpt_core.pruner.check_settings`), on models of
each shape built on the ``meta`` device -- no weights are made, the device's free memory is
read as the worker reads it. One JSON line per (shape, ratio).

    python benchmarks/search_fit.py --device cuda [--ratios 0.2 0.5]

On a CPU the levels' budget is ``alloc_search.CPU_LEVEL_BYTES``.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimgpt_core.errors import SettingUnavailableError
from slimgpt_core.presets import preset_settings
from slimgpt_core.pruner import PruneConfig, check_settings, search_fit

GQA_8 = {"num_key_value_heads": 8, "vocab_size": 128256}
SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, **GQA_8},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, **GQA_8},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, **GQA_8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device = torch.device(args.device)
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(getattr(torch, args.dtype))
        for ratio in args.ratios:
            config = PruneConfig(target_ratio=ratio, device=args.device,
                                 **preset_settings("thorough"))
            row: dict[str, object] = {"shape": name, "ratio": ratio, "device": str(device)}
            try:
                check_settings(model, config)
                row["grid"] = search_fit(model, config, device)
            except SettingUnavailableError as exc:
                row["refused"] = str(exc)
            if device.type == "cuda":
                row["free_gib"] = round(torch.cuda.mem_get_info(device)[0] / 2**30, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
