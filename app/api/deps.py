"""Dependencies: settings, a DB session per request, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.limits import check_request_rate
from app.core.config import Settings
from app.core.security import parse_api_key
from app.crud.tenants import authenticate, get_or_create_tenant
from app.db.models import Tenant

LOCAL_TENANT = "local"


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


#: The two ways to present an API key, as OpenAPI security schemes ("Authorize" in /docs).
#: auto_error=False: get_tenant itself answers 401, in the API's error shape.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                           description="`Authorization: Bearer <API key>`")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="`X-API-Key: <API key>`")


def get_tenant(
    request: Request, session: SessionDep, settings: SettingsDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
    _header: Annotated[str | None, Security(api_key_scheme)] = None,
) -> Tenant:
    key: str | None = None
    if settings.auth_disabled:
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
    else:
        key = _presented_key(request)
        tenant = authenticate(session, key) if key else None
        if tenant is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # The key's id, for checks during long requests (an SSE stream ends when it is revoked).
        request.state.api_key_id = parse_api_key(key)  # type: ignore[arg-type]
    session.expunge(tenant)  # keep its loaded fields: the rollback below would expire them
    session.rollback()  # end the read transaction before the route's work
    request.state.tenant_id = tenant.id
    check_request_rate(session, tenant.id, settings)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
