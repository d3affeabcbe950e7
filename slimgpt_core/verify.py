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


# The streamed loader builds the model from the folder's config with parameters on ``meta``
# and loads each decoder layer from the shards just before its forward (strict: every tensor
# the architecture expects, nothing else, right shapes), so a model larger than host memory
# can be checked. It uses transformers, accelerate and safetensors only.
_STREAMED_LOADER = r"""
import json, os, sys
import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

args = json.loads(sys.argv[1])
folder, device = args["folder"], torch.device(args["device"])
dtype = getattr(torch, args["dtype"])
trc = args["trust_remote_code"]
config = AutoConfig.from_pretrained(folder, trust_remote_code=trc)
if args["attn_implementation"]:
    config._attn_implementation = args["attn_implementation"]
with init_empty_weights(include_buffers=False):
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trc)
model.eval()
index = os.path.join(folder, "model.safetensors.index.json")
if os.path.exists(index):
    weight_map = json.load(open(index))["weight_map"]
else:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as fh:
        weight_map = {k: "model.safetensors" for k in fh.keys()}
handles = {}
def get(key):
    name = weight_map[key]
    if name not in handles:
        handles[name] = safe_open(os.path.join(folder, name), "pt", device="cpu")
    return handles[name].get_tensor(key)

layers = model.model.layers
prefix = next(n for n, m in model.named_modules() if m is layers) + "."
state = {}
seen = set()
for k, v in model.state_dict(keep_vars=True).items():
    if id(v) in seen:
        continue  # a tied alias is stored once
    seen.add(id(v))
    state[k] = v
expected = set(state)
missing = sorted(expected - set(weight_map))
unexpected = sorted(set(weight_map) - expected)
mismatched = []
outside = {k: get(k) for k in state if not k.startswith(prefix) and k in weight_map}
model.load_state_dict(outside, strict=False, assign=True)
model.tie_weights()
for name, module in model.named_children():
    if name != "model":
        module.to(device)
for name, module in model.model.named_children():
    if name != "layers":
        module.to(device)
num_parameters = sum(p.numel() for p in model.parameters())

def pre(module, _args):
    i = int(module._slimgpt_index)
    p = f"{prefix}{i}."
    tensors = {k[len(p):]: get(k) for k in weight_map if k.startswith(p)}
    own = set(module.state_dict())
    for k in own & set(tensors):
        if tuple(module.state_dict()[k].shape) != tuple(tensors[k].shape):
            mismatched.append(f"{p}{k}")
    module.load_state_dict(tensors, strict=True, assign=True)
    module.to(device=device, dtype=dtype)

def post(module, _args, _out):
    module.to("meta")

for i, layer in enumerate(layers):
    layer._slimgpt_index = i
    layer.register_forward_pre_hook(pre)
    layer.register_forward_hook(post)
ids = load_file(args["inputs"])["input_ids"].to(device)
with torch.no_grad():
    logits = model(ids).logits.float().cpu()
save_file({"logits": logits.contiguous()}, args["output"])
meta = {
    "class": type(model).__name__,
    "num_parameters": num_parameters,
    "missing_keys": missing,
    "unexpected_keys": unexpected,
    "mismatched_keys": mismatched,
    "streamed": True,
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
    reference_logits: torch.Tensor | None = None,
    streamed: bool = False,
) -> dict[str, Any]:
    """Load ``folder`` in a separate process and compare its logits on ``input_ids`` with
    ``model``'s. Returns the result dict (also on failure when ``raise_on_failure`` is False).

    ``streamed``: ``model`` is a skeleton whose layers are not in memory; the caller gives
    the logits it computed for ``input_ids`` while pruning (``reference_logits``), and the
    fresh process loads the folder one layer at a time (so the check fits any model size).
    """
    folder = Path(folder)
    dtype = _model_dtype(model)
    if streamed:
        if reference_logits is None:
            raise ValueError("a streamed model needs reference_logits to be verified")
        default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        default_device = _model_device(model)
    device = torch.device(device) if device is not None else default_device
    input_ids = input_ids.long().cpu().contiguous()
    attn_impl = getattr(model.config, "_attn_implementation", None)
    t0 = time.perf_counter()
    if reference_logits is not None:
        reference = reference_logits.float().cpu()
    else:
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
            loader = _STREAMED_LOADER if streamed else _LOADER
            proc = subprocess.run([sys.executable, "-c", loader, json.dumps(args)], check=False,
                                  env=env,
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
        "streamed": streamed,
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
