"""/v1/estimate: the dry run, torch-free (slimgpt_core.schedule)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException

from app.api.deps import SettingsDep, TenantDep
from app.api.resolve import resolve_model
from app.schemas import ErrorOut, EstimateOut, EstimateRequest

router = APIRouter(prefix="/v1", tags=["estimate"])

MAX_CONFIG_BYTES = 1024 * 1024


@router.post("/estimate", response_model=EstimateOut, responses={422: {"model": ErrorOut}},
             summary="Per-layer widths and parameter counts a job would produce (dry run)")
def estimate(body: EstimateRequest, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    from slimgpt_core.schedule import PlanError
    from slimgpt_core.schedule import estimate as plan_estimate

    config = body.config
    if config is None:
        assert body.model_id is not None
        source, folder = resolve_model(settings, body.model_id)
        if source != "local" or folder is None:
            raise HTTPException(
                422, detail="model_id: the API does not download from the Hub; pass the model's "
                "config.json as `config`, or name a folder under the local models root")
        path = folder / "config.json"
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            raise HTTPException(422, detail=f"model_id: {body.model_id} has no usable config.json")
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HTTPException(422, detail=f"model_id: config.json is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise HTTPException(422, detail="model_id: config.json is not a JSON object")
    try:
        plan = plan_estimate(
            config, body.target_ratio, body.schedule, body.pruning.gqa_policy,
            body.pruning.alpha, body.pruning.heads, body.pruning.ffn,
            plain_heads=body.export.profile == "uniform",
        )
    except PlanError as err:
        raise HTTPException(422, detail=str(err)) from None
    plan["export_profile"] = body.export.profile
    if body.export.profile == "uniform" and not plan.get("uniform_widths", True):
        plan.setdefault("notes", []).append(
            "export profile 'uniform' needs equal widths in every layer; this plan has not")
    return plan
