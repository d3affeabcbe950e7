"""The fresh-process verification: a good folder passes and the result is recorded; a folder
whose logits differ fails with a clear ExportVerificationError. (Each check starts a python
process, about 15 s here, so there are few of them.)"""

from __future__ import annotations

import json

import pytest
import torch
from _export_helpers import export, make_pruned

from slimgpt_core.verify import ExportVerificationError, verify_export


@pytest.mark.parametrize(("case", "profile"), [("gqa_free", "hetero"), ("qwen2_bias", "uniform")])
def test_verified_export_loads_in_fresh_process_and_records_result(pruned, tmp_path, case,
                                                                   profile):
    result, ids = pruned(case, "uniform" if profile == "uniform" else "log")
    folder = tmp_path / "model"
    report = export(result, ids, folder, profile=profile, verify=True,
                    verify_ids=ids[:3, :16])
    v = report.verification
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"]
    assert v["windows"] == 3 and v["trust_remote_code"] == (profile == "hetero")
    assert v["loaded_num_parameters"] == result.params_after
    recorded = json.loads((folder / "pruning_config.json").read_text())["verification"]
    assert recorded["passed"] is True and recorded["tolerance"] == v["tolerance"]
    assert "matched the in-memory pruned model" in (folder / "README.md").read_text()
    assert not list(tmp_path.glob(".*partial"))


def test_verification_fails_clearly_when_logits_differ(tmp_path):
    result, ids = make_pruned("gqa_balanced")
    folder = tmp_path / "model"
    export(result, ids, folder)  # unverified write
    with torch.no_grad():  # the in-memory model drifts from what was written
        result.model.model.layers[1].mlp.down_proj.weight.add_(0.5)
    with pytest.raises(ExportVerificationError, match="exceeds the tolerance"):
        verify_export(folder, result.model, ids[:2], trust_remote_code=True)
