"""Prove an exported folder loads in a fresh process and computes what the pruned model computes.

The check runs a small loader script with the same interpreter in a separate process (so no class,
module cache or monkeypatch of the exporting process can help it), feeds it token windows through
a temporary safetensors file, and compares its logits with the in-memory model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Allowed max |logit difference|, relative to max(1, max |reference logit|), per dtype. Same
#: weights, same kernels: fp32 agrees to rounding noise; half precisions get a few ulps of slack
#: for kernel choices that may differ between processes (thread count, sdpa backend).
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float64: 1e-8,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


class ExportVerificationError(RuntimeError):
    """The exported folder does not load, or its logits differ from the pruned model's."""


def tolerance_for(dtype: torch.dtype, reference_scale: float) -> float:
    """Absolute tolerance on max |logit difference| for ``dtype``."""
    return RELATIVE_TOLERANCE.get(dtype, 3e-2) * max(1.0, reference_scale)


# The loader uses nothing but transformers, as a user would. It writes logits, parameter count
# and loading info (missing/unexpected/mismatched keys) for the parent to judge.
_LOADER = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

args = json.loads(sys.argv[1])
dtype = getattr(torch, args["dtype"])
kwargs = dict(dtype=dtype, output_loading_info=True)
if args["trust_remote_code"]:
    kwargs["trust_remote_code"] = True
if args["attn_implementation"]:
    kwargs["attn_implementation"] = args["attn_implementation"]
model, info = AutoModelForCausalLM.from_pretrained(args["folder"], **kwargs)
model.to(args["device"]).eval()
ids = load_file(args["inputs"])["input_ids"].to(args["device"])
with torch.no_grad():
    logits = model(ids).logits.float().cpu()
save_file({"logits": logits.contiguous()}, args["output"])
meta = {
    "class": type(model).__name__,
    "num_parameters": sum(p.numel() for p in model.parameters()),
    "missing_keys": sorted(info.get("missing_keys", [])),
    "unexpected_keys": sorted(info.get("unexpected_keys", [])),
    "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
}
with open(args["meta"], "w") as fh:
    json.dump(meta, fh)
"""


def default_windows(vocab_size: int, num_windows: int = 2, seqlen: int = 32,
                    seed: int = 0) -> torch.Tensor:
    """Deterministic random token windows, used when the caller gives none."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_windows, seqlen), generator=gen)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def verify_export(
    folder: str | Path,
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    trust_remote_code: bool,
    device: str | torch.device | None = None,
    timeout_s: float = 900.0,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Load ``folder`` in a separate process and compare its logits on ``input_ids`` with
    ``model``'s. Returns the result dict (also on failure when ``raise_on_failure`` is False)."""
    folder = Path(folder)
    dtype = _model_dtype(model)
    device = torch.device(device) if device is not None else _model_device(model)
    input_ids = input_ids.long().cpu().contiguous()
    attn_impl = getattr(model.config, "_attn_implementation", None)
    t0 = time.perf_counter()
    with torch.no_grad():
        reference = model(input_ids.to(_model_device(model))).logits.float().cpu()

    with tempfile.TemporaryDirectory(prefix="slimgpt-verify-") as tmp:
        from safetensors.torch import load_file, save_file

        inputs, output, meta_path = (os.path.join(tmp, n) for n in
                                     ("inputs.safetensors", "logits.safetensors", "meta.json"))
        save_file({"input_ids": input_ids}, inputs)
        args = {
            "folder": str(folder.resolve()), "inputs": inputs, "output": output, "meta": meta_path,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "trust_remote_code": trust_remote_code, "attn_implementation": attn_impl,
        }
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   TOKENIZERS_PARALLELISM="false")
        # A fresh process must not see this process's import path tweaks for slimgpt_core:
        # the folder has to stand on its own.
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(args)], env=env,
                                  cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ExportVerificationError(
                f"verification: loading {folder} in a fresh process took over {timeout_s:.0f}s"
            ) from None
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ExportVerificationError(
                f"verification: {folder} does not load in a fresh python process "
                f"(exit {proc.returncode}):\n{tail}"
            )
        loaded = load_file(output)["logits"]
        with open(meta_path) as fh:
            meta = json.load(fh)

    scale = float(reference.abs().max())
    tol = tolerance_for(dtype, scale)
    if loaded.shape != reference.shape:
        max_diff = float("inf")
    else:
        max_diff = float((loaded - reference).abs().max())
    key_problems = {k: meta[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if meta[k]}
    expected_params = sum(p.numel() for p in model.parameters())
    passed = (max_diff <= tol and not key_problems
              and meta["num_parameters"] == expected_params)
    result = {
        "passed": passed,
        "max_abs_diff": max_diff,
        "tolerance": tol,
        "tolerance_rule": f"{RELATIVE_TOLERANCE.get(dtype, 3e-2):g} * max(1, max|logit|) "
                          f"for {str(dtype).removeprefix('torch.')}",
        "reference_max_abs_logit": scale,
        "windows": int(input_ids.shape[0]),
        "seqlen": int(input_ids.shape[1]),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "attn_implementation": attn_impl,
        "trust_remote_code": trust_remote_code,
        "loaded_class": meta["class"],
        "loaded_num_parameters": meta["num_parameters"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if key_problems:
        result["loading_problems"] = key_problems
    if not passed and raise_on_failure:
        reasons = []
        if loaded.shape != reference.shape:
            reasons.append(f"logits shape {tuple(loaded.shape)} != {tuple(reference.shape)}")
        elif max_diff > tol:
            reasons.append(f"max |logit diff| {max_diff:.3g} exceeds the tolerance {tol:.3g} "
                           f"({result['tolerance_rule']})")
        if key_problems:
            reasons.append(f"weights did not load cleanly: {key_problems}")
        if meta["num_parameters"] != expected_params:
            reasons.append(f"reloaded model has {meta['num_parameters']} parameters, the pruned "
                           f"model {expected_params}")
        raise ExportVerificationError(
            f"verification of {folder} failed on {result['windows']} windows: "
            + "; ".join(reasons)
        )
    return result
