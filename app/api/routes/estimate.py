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
    notes = _preset_notes(body, config)
    if notes:
        plan.setdefault("notes", []).extend(notes)
    plan["resources"] = _resources(body, config, settings)
    if body.export.profile == "uniform" and not plan.get("uniform_widths", True):
        plan.setdefault("notes", []).append(
            "export profile 'uniform' needs equal widths in every layer; this plan has not")
    return plan


def _preset_notes(body: EstimateRequest, config: dict[str, Any]) -> list[str]:
    """422 when the preset cannot run on this family or GPU count; else what the estimate
    does not show of it."""
    from slimgpt_core.availability import unavailable
    from slimgpt_core.families import family_for_config
    from slimgpt_core.presets import estimate_notes, preset_settings

    preset = body.pruning.preset
    # A bare config reads as Llama's, as ModelShape.from_config reads it.
    family = family_for_config({"model_type": "llama", **config})
    why = unavailable(preset_settings(preset), family,
                      world_size=body.resources.gpus if body.resources is not None else 1)
    if why is not None:
        raise HTTPException(422, detail=f"pruning.preset {preset!r}: {why}")
    return estimate_notes(preset)


def _resources(body: EstimateRequest, config: dict[str, Any],
               settings: Any) -> dict[str, Any]:
    """Peak GPU/host memory, disk and predicted time per GPU type and count (cost model
    fitted on H200 runs), and which worker pool a job with ``body.resources`` would use."""
    from app.routing import NoWorkerPool, pools_from_settings, route
    from slimgpt_core.costs import COEFFICIENTS, Workload, estimate_table
    from slimgpt_core.schedule import ModelShape, make_plan

    shape = ModelShape.from_config(config)
    plan = make_plan(shape, body.target_ratio, body.schedule, body.pruning.gqa_policy,
                     body.pruning.alpha, body.pruning.heads, body.pruning.ffn,
                     body.export.profile == "uniform")
    work = Workload(body.calibration.num_samples, body.calibration.seq_len)
    out: dict[str, Any] = {
        "estimates": estimate_table(shape, plan, work),
        "model": {"fitted_on": "H200 benchmark runs (docs/BENCHMARKS.md)",
                  "time_error_on_fitted_runs": COEFFICIENTS.error_fit,
                  "time_error_leave_one_shape_out": COEFFICIENTS.error_leave_one_out,
                  "other_gpu_types": "scaled from the H200 by datasheet ratios; not measured"},
    }
    if body.resources is not None:
        request = body.model_dump(mode="json")
        try:
            pool = route(request, pools_from_settings(settings), config)
            out["route"] = {"queue": pool.queue, "pool": pool.describe(), "fits": True}
        except NoWorkerPool as err:
            out["route"] = {"queue": None, "fits": False, "reason": str(err),
                            "estimates": err.estimates}
    return out
