"""vLLM (CPU build, its own venv) serves `hetero` exports of every family the plugin builds from
vLLM's own layers (Qwen3, Granite, Phi-3, Gemma 2, Gemma 3) as transformers runs them.

No small real checkpoints of these families are available offline, so each is a tiny random
model of its stock transformers config (tests/core/family_cases.py, with ``head_dim`` 32: vLLM's
CPU attention has no smaller head size), pruned the most irregular way a `hetero` export can be
(log schedule, 50%, 3 of 8 query heads gone under the `free` GQA policy: every layer reads its
KV heads by index, so every layer is served through the padded layout). Each family keeps what
makes it its own: Qwen3's per-head q/k norms, Granite's four multipliers with attention and MLP
biases, Phi-3's fused matrices and partial rotary, Gemma 2's soft-capping and alternating
sliding windows (8 tokens, shorter than the prompts), Gemma 3's per-head norms and local/global
rotary bases.

* generations: vLLM's greedy token ids equal transformers' (the exported folder loaded with the
  shipped code, greedy decoding with its KV cache), 32 new tokens on six prompts of 5 to 31
  tokens;
* logits: every top-5 log-probability vLLM reports at every prompt and generated position is
  within ``LOGPROB_ATOL`` of transformers' log-softmax for that token.

One vLLM process serves all the models one after the other; a second one is asked to load an
OLMo-2 `hetero` export and must refuse it with the reason. Runs with ``SLIMGPT_TEST_VLLM=1``
(``make test-vllm``), like test_vllm_equivalence.py, whose helpers it uses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_vllm_equivalence import (
    MAX_TOKENS,
    TOP_LOGPROBS,
    _enabled,
    _max_logprob_diff,
    _run_vllm,
    transformers_reference,
)
from vllm_venv import ensure_vllm_venv, vllm_env

from tests.core.family_cases import VOCAB, tiny_model, windows

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

#: Max |log-probability difference| between vLLM and transformers (float32, CPU). Measured here
#: over ~1,540 values per family: 6.8e-6 (Qwen3), 2.9e-6 (Granite), 1.1e-5 (Phi-3), 5.3e-6
#: (Gemma 2), 2.9e-6 (Gemma 3); tighter than SmolLM2's 2e-3 because these layers are tiny.
LOGPROB_ATOL = 1e-4
#: The Llama-layer families too (the real SmolLM2 covers Llama in test_vllm_equivalence.py):
#: Mistral's window and Qwen2's biases are switches of the shared Llama layer.
FAMILIES = ["qwen3", "granite", "phi3", "gemma2", "gemma3", "llama", "mistral", "qwen2"]
#: vLLM's CPU attention kernels start at head size 32. Weights drawn 10x wider than the
#: configs' default make the outputs peaked (top-1 log-probabilities around -1 instead of a
#: nearly uniform -4.6 over 128 tokens), so a wrong window, cap or multiplier shows.
SERVING_OVERRIDES = {"head_dim": 32, "max_position_embeddings": 256, "initializer_range": 0.2}
#: Qwen3 as released (no sliding window): vLLM's own Qwen3 refuses windows on some layers only.
FAMILY_OVERRIDES = {"qwen3": {"use_sliding_window": False, "sliding_window": None}}


def _export(family: str, folder: Path) -> None:
    from slimgpt_core.export import describe_calibration, export_pruned
    from slimgpt_core.pruner import PruneConfig, prune_model

    model = tiny_model(family, overrides={**SERVING_OVERRIDES, **FAMILY_OVERRIDES.get(family, {})})
    result = prune_model(model, windows(), PruneConfig(
        target_ratio=0.5, schedule="log", gqa_policy="free", head_ratio=0.375,
        batch_size=4, min_group=8))
    export_pruned(result, folder, tokenizer=None, profile="hetero",
                  base_model_id=f"tests/tiny-{family}",
                  calibration_info=describe_calibration(windows(), source="random"),
                  verify=False)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 14, 20, 24, 31)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """family -> (transformers reference, vLLM result)."""
    _enabled()
    python = ensure_vllm_venv()
    prompts = _prompts()
    root = tmp_path_factory.mktemp("vllm-families")
    reference, models = {}, []
    for family in FAMILIES:
        folder = root / family
        _export(family, folder)
        reference[family] = transformers_reference(folder, "hetero", prompts)
        models.append({"name": family, "path": str(folder)})
    got = _run_vllm(python, models, prompts, root / "run",
                    spec_extra={"skip_tokenizer_init": True, "memory_utilization": 0.1,
                                "max_model_len": 128})
    return {f: (reference[f], got["models"][f]) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_serves_the_family_through_the_plugin(served, family):
    _, got = served[family]
    assert got["architectures"][0].startswith("SlimGPT")
    assert got["plugin_registered"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_greedy_generations_equal_transformers(served, family):
    ref, got = served[family]
    for i, (r, g) in enumerate(zip(ref, got["outputs"], strict=True)):
        assert len(r["token_ids"]) == MAX_TOKENS
        assert g["token_ids"] == r["token_ids"], f"{family}, prompt {i}"


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_logprobs_agree_with_transformers(served, family):
    ref, got = served[family]
    worst, compared = 0.0, 0
    for r, g in zip(ref, got["outputs"], strict=True):
        w, c = _max_logprob_diff(r, g)
        worst, compared = max(worst, w), compared + c
    assert compared >= len(ref) * MAX_TOKENS * TOP_LOGPROBS
    print(f"{family}: max |logprob diff| {worst:.2e} over {compared} values")
    assert worst <= LOGPROB_ATOL


def test_vllm_refuses_an_olmo2_hetero_export_with_the_reason(tmp_path):
    _enabled()
    python = ensure_vllm_venv()
    _export("olmo2", tmp_path / "olmo2")
    (tmp_path / "spec.json").write_text(json.dumps({
        "models": [{"name": "olmo2", "path": str(tmp_path / "olmo2")}], "prompts": [[5, 6, 7]],
        "max_tokens": 4, "logprobs": 1, "skip_tokenizer_init": True,
        "memory_utilization": 0.1, "max_model_len": 128}))
    proc = subprocess.run([str(python), str(HERE / "vllm_generate.py"), "spec.json", "out.json"],
                          cwd=tmp_path, env=vllm_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "SlimGPTOlmo2ForCausalLM checkpoints are not served by the SlimGPT vLLM plugin" in log
    assert "root-mean-square" in log
