"""/v1/hub-token: the tenant's Hugging Face token, write-only (never returned or logged)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.crud.tenants import delete_hub_token, get_hub_token_row, set_hub_token
from app.schemas import HubTokenIn, HubTokenStatus

router = APIRouter(prefix="/v1/hub-token", tags=["hub token"])


@router.put("", status_code=204, summary="Store (or replace) the tenant's Hub token")
def put_token(body: HubTokenIn, tenant: TenantDep, session: SessionDep,
              settings: SettingsDep) -> Response:
    set_hub_token(session, tenant.id, body.token, settings.fernet_key())
    return Response(status_code=204)


@router.delete("", status_code=204, summary="Forget the tenant's Hub token")
def delete_token(tenant: TenantDep, session: SessionDep) -> Response:
    delete_hub_token(session, tenant.id)
    return Response(status_code=204)


@router.get("", response_model=HubTokenStatus,
            summary="Whether a token is stored (the token itself is never returned)")
def token_status(tenant: TenantDep, session: SessionDep) -> HubTokenStatus:
    row = get_hub_token_row(session, tenant.id)
    return HubTokenStatus(configured=row is not None,
                          updated_at=row.updated_at if row is not None else None)
