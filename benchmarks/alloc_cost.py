"""Cost and outcome of ``allocation="sensitivity"`` on CPU: seconds per part, the plan it makes,
and (``--eval``) the perplexity of the model pruned by that plan.

    OMP_NUM_THREADS=1 python benchmarks/alloc_cost.py --model smollm2 --ratios 0.2 0.47 --eval
    OMP_NUM_THREADS=1 python benchmarks/alloc_cost.py --model random --ratios 0.2

``--model smollm2``: the real SmolLM2-135M (fp32), 64 x 512 calibration windows (seed 0) from
``../shared/data/calib.txt``, perplexity on 24 consecutive 512-token windows of ``eval.txt``.
``--model random``: random weights of a Llama shape (hidden 1024, 8 layers, 16 query / 4 KV
heads, FFN 2816; ``--mha``: 16 KV heads), random calibration ids. One JSON line per ratio.
Works against any checkout of the library (``PYTHONPATH``): options the checkout's
``sensitivity_plan`` does not know are left out.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _timed(module: object, name: str, seconds: dict[str, float]) -> None:
    """Wrap ``module.name`` so that its wall time is added to ``seconds[name]``."""
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.process_time() - t0

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--mha", action="store_true", help="random model: multi-head attention")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.47])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", action="store_true", help="prune by the plan and measure perplexity")
    ap.add_argument("--option", action="append", default=[],
                    help="KEY=VALUE passed to sensitivity_plan (ints), e.g. curve_windows=16")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from slimgpt_core import allocation, layer_io
    from slimgpt_core.pruner import PruneConfig, model_family, model_shape, prune_model
    from slimgpt_core.schedule import make_plan

    eval_ids = None
    if args.model == "smollm2":
        from slimgpt_core.calibration import consecutive_windows, sample_windows
        from slimgpt_core.loading import load_base_model
        from slimgpt_core.smollm2 import smollm2_gguf_path

        model, tok, _ = load_base_model(str(smollm2_gguf_path()), dtype=torch.float32)
        calib = sample_windows((SHARED / "calib.txt").read_text(), tok, args.nsamples,
                               args.seqlen, seed=0)
        eval_ids = consecutive_windows((SHARED / "eval.txt").read_text(), tok, 512, 24)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16 if args.mha else 4,
                          vocab_size=32000, max_position_embeddings=4096)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).float().eval()
        calib = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen),
                              generator=torch.Generator().manual_seed(1))
    model.eval()
    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    accepted = inspect.signature(allocation.sensitivity_plan).parameters
    options = {k: v for k, v in options.items() if k in accepted}

    seconds: dict[str, float] = defaultdict(float)
    for name in ("output_sensitivity", "measure_curves", "head_curve", "channel_curve",
                 "_weighted_error"):
        if hasattr(allocation, name):
            _timed(allocation, name, seconds)
    _timed(layer_io, "capture_layer_inputs", seconds)

    dense_ppl = None
    for ratio in args.ratios:
        seconds.clear()
        config = PruneConfig(target_ratio=ratio, device="cpu", batch_size=4)
        base = make_plan(model_shape(model), ratio, config.schedule, config.gqa_policy,
                         config.alpha, config.head_ratio, config.ffn_ratio, config.plain_heads)
        t0, c0 = time.perf_counter(), time.process_time()
        plan = allocation.sensitivity_plan(
            model, calib, base, config.gqa_policy, config.percdamp, config.min_group,
            config.max_group, config.batch_size, torch.device("cpu"), model_family(model),
            **options)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"label": args.label, "model": args.model + ("-mha" if args.mha else ""),
               "ratio": ratio, "options": options, "allocation_s": round(total, 2),
               "allocation_cpu_s": round(cpu, 2),
               "parts_cpu_s": {k: round(v, 2) for k, v in seconds.items()},
               "heads_removed": [lp.heads_removed for lp in plan.layers],
               "channels_removed": [lp.channels_removed for lp in plan.layers],
               "base_heads_removed": [lp.heads_removed for lp in base.layers],
               "base_channels_removed": [lp.channels_removed for lp in base.layers],
               "params_after": plan.decoder_params_after}
        if args.eval and eval_ids is not None:
            from slimgpt_core.evaluate import perplexity

            if dense_ppl is None:
                dense_ppl = perplexity(model, eval_ids)
            original = allocation.sensitivity_plan
            allocation.sensitivity_plan = lambda *_a, _plan=plan, **_k: _plan  # reuse it
            try:
                pruned = copy.deepcopy(model)
                t1 = time.perf_counter()
                prune_model(pruned, calib, PruneConfig(target_ratio=ratio, device="cpu",
                                                       batch_size=4, allocation="sensitivity"))
                row["prune_s"] = round(time.perf_counter() - t1, 2)
            finally:
                allocation.sensitivity_plan = original
            ppl = perplexity(pruned, eval_ids)
            row.update(perplexity=round(ppl, 3), dense_perplexity=round(dense_ppl, 3),
                       x_dense=round(ppl / dense_ppl, 4))
            del pruned
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
