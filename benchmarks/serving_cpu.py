"""CPU serving speed of SmolLM2-135M shapes, dense vs pruned: transformers and vLLM-CPU side by side.

    python benchmarks/serving_cpu.py                       # ratios 0, 0.2, 0.5; float32
    python benchmarks/serving_cpu.py --ratios 0 0.5 --prefill 256 --steps 16

The pruned shapes are the pruner's plan (log schedule, ``balanced``); the weights are random (same
compute as real ones), saved as export-style folders: the dense one a plain ``LlamaForCausalLM``,
the pruned ones ``hetero`` (``SlimGPTLlamaForCausalLM``), which vLLM serves through the plugin.
transformers runs in this process (eager, sdpa, dynamic KV cache); vLLM runs in its own venv
(``tests/serving/vllm_venv.py``, built on first use) with ``enforce_eager`` and every model in one
process. Figures: prefill tokens/s (batch 1), decode tokens/s at each batch size after a
``--context``-token prompt (vLLM: the time of ``steps + 1`` tokens less the time of 1, per token).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# -- the vLLM side (runs in the vLLM venv) ------------------------------------------------------
def vllm_side(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = __import__("random").Random(0)
    out: dict[str, Any] = {}

    def prompts(n: int, length: int) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, spec["vocab"])
                                               for _ in range(length)]) for _ in range(n)]

    def timed(llm: LLM, ps: list[TokensPrompt], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        return time.perf_counter() - t0

    for name, path in spec["folders"].items():
        t0 = time.perf_counter()
        llm = LLM(model=path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                  # on CPU: the share of host memory reserved for the KV cache (small models)
                  gpu_memory_utilization=0.1, max_model_len=spec["prefill"] + 64, seed=0,
                  max_num_seqs=max(spec["batches"]), enable_prefix_caching=False)
        row: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1)}
        timed(llm, prompts(1, 32), 2)  # warm-up
        t = min(timed(llm, prompts(1, spec["prefill"]), 1) for _ in range(spec["reps"]))
        row["prefill_tok_s"] = round(spec["prefill"] / t, 1)
        for b in spec["batches"]:
            ps = prompts(b, spec["context"])
            one = timed(llm, ps, 1)
            many = timed(llm, prompts(b, spec["context"]), spec["steps"] + 1)
            row[f"decode_b{b}_tok_s"] = round(b * spec["steps"] / max(1e-9, many - one), 1)
        out[name] = row
        del llm
        __import__("gc").collect()
    return out


# -- the transformers side and the driver (main venv) -------------------------------------------
def make_folders(root: Path, ratios: list[float]) -> dict[str, str]:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference_speed import build, model_config

    folders = {}
    for ratio in ratios:
        config = model_config("smollm2", ratio)
        model = build(config, torch.float32, "cpu")
        folder = root / f"smollm2-{int(ratio * 100)}"
        if ratio == 0:  # the dense folder is a plain Llama checkpoint, as the base model is
            from transformers import LlamaConfig, LlamaForCausalLM

            plain = LlamaConfig(**{k: v for k, v in config.to_dict().items()
                                   if not k.startswith("layer_") and k not in (
                                       "model_type", "architectures", "auto_map")})
            dense = LlamaForCausalLM(plain)
            dense.load_state_dict(model.state_dict())
            model = dense
        model.save_pretrained(folder)
        folders[f"{ratio:.0%}"] = str(folder)
    return folders


def transformers_side(folders: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference_speed import bench_decode_eager, bench_prefill

    from slimgpt_core.modeling_slimgpt import SlimGPTLlamaForCausalLM

    out = {}
    for name, path in folders.items():
        hetero = json.loads((Path(path) / "config.json").read_text())["model_type"] != "llama"
        cls = SlimGPTLlamaForCausalLM if hetero else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=torch.float32).eval()
        model.config._attn_implementation = "sdpa"
        row = {"params": sum(p.numel() for p in model.parameters()),
               "prefill_tok_s": round(bench_prefill(model, args.prefill, "cpu", args.reps), 1)}
        for b in args.batches:
            row[f"decode_b{b}_tok_s"] = round(
                bench_decode_eager(model, b, args.context, args.steps, "cpu"), 1)
        out[name] = row
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vllm-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_side:
        spec = json.loads(Path(args.vllm_side[0]).read_text())
        Path(args.vllm_side[1]).write_text(json.dumps(vllm_side(spec)))
        return

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(ROOT / "tests" / "serving"))
    from vllm_venv import ensure_vllm_venv, vllm_env

    with tempfile.TemporaryDirectory(prefix="slimgpt-serving-bench-") as tmp:
        root = Path(tmp)
        folders = make_folders(root, args.ratios)
        hf = transformers_side(folders, args)
        print(json.dumps({"transformers": hf}), flush=True)  # kept if the vLLM side fails
        spec = {"folders": folders, "prefill": args.prefill, "context": args.context,
                "batches": args.batches, "steps": args.steps, "reps": args.reps,
                "vocab": 49152}
        (root / "spec.json").write_text(json.dumps(spec))
        python = ensure_vllm_venv()
        with (root / "vllm.log").open("w") as log:
            proc = subprocess.run([str(python), __file__, "--vllm-side", str(root / "spec.json"),
                                   str(root / "out.json")], env=vllm_env(), cwd=tmp,
                                  stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            print((root / "vllm.log").read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"vLLM side failed ({proc.returncode})")
        vl = json.loads((root / "out.json").read_text())
    print(json.dumps({"transformers": hf, "vllm": vl}))
    dense = "0%"
    for engine, rows in (("transformers", hf), ("vllm-cpu", vl)):
        for name, row in rows.items():
            cells = [f"{engine} {name}"]
            for key in ("prefill_tok_s", *(f"decode_b{b}_tok_s" for b in args.batches)):
                ratio = row[key] / rows[dense][key] if dense in rows else float("nan")
                cells.append(f"{key.removesuffix('_tok_s')} {row[key]:.1f} tok/s ({ratio:.2f}x)")
            print(" | ".join(cells))
    print(" | ".join(f"params {n} {hf[n]['params'] / 1e6:.1f}M" for n in hf))


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    main()
