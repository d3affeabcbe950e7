"""Tenants, API keys (hashed) and Hub tokens (encrypted)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import (
    digest_matches,
    encrypt_token,
    generate_api_key,
    parse_api_key,
)
from app.db.base import utcnow
from app.db.models import ApiKey, HubToken, Tenant

log = logging.getLogger("slimgpt.auth")


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).first()
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def create_api_key(session: Session, tenant_name: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if needed). Returns the record and the full key, which
    is shown once and never stored."""
    tenant = get_or_create_tenant(session, tenant_name)
    key_id, full, digest = generate_api_key()
    record = ApiKey(id=key_id, tenant_id=tenant.id, key_hash=digest, name=name)
    session.add(record)
    session.commit()
    log.info("created API key %s for tenant %s", key_id, tenant.name)
    return record, full


def revoke_api_key(session: Session, key_id: str) -> bool:
    record = session.get(ApiKey, key_id)
    if record is None:
        return False
    if record.revoked_at is None:
        record.revoked_at = utcnow()
    session.commit()
    log.info("revoked API key %s", key_id)
    return True


def list_api_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every API key (of one tenant) with its tenant's name, oldest first; never the secrets."""
    stmt = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
    if tenant_name is not None:
        stmt = stmt.where(Tenant.name == tenant_name)
    return [(k, n) for k, n in session.execute(stmt.order_by(ApiKey.created_at, ApiKey.id))]


def authenticate(session: Session, full_key: str) -> Tenant | None:
    """The tenant of a valid, unrevoked key, else None."""
    key_id = parse_api_key(full_key)
    if key_id is None:
        return None
    record = session.get(ApiKey, key_id)
    if record is None or record.revoked_at is not None:
        return None
    if not digest_matches(full_key, record.key_hash):
        return None
    return record.tenant


def api_key_active(session: Session, key_id: str) -> bool:
    """The key exists and is not revoked (re-checked during long requests)."""
    record = session.get(ApiKey, key_id)
    return record is not None and record.revoked_at is None


def count_api_keys(session: Session) -> int:
    return len(list(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)))))


def set_hub_token(session: Session, tenant_id: str, token: str, fernet_key: bytes) -> None:
    blob = encrypt_token(fernet_key, token)
    row = session.get(HubToken, tenant_id)
    if row is None:
        session.add(HubToken(tenant_id=tenant_id, ciphertext=blob, updated_at=utcnow()))
    else:
        row.ciphertext = blob
        row.updated_at = utcnow()
    try:
        session.commit()
    except IntegrityError:  # a concurrent PUT inserted first: overwrite it
        session.rollback()
        row = session.get(HubToken, tenant_id)
        assert row is not None
        row.ciphertext, row.updated_at = blob, utcnow()
        session.commit()


def delete_hub_token(session: Session, tenant_id: str) -> bool:
    row = session.get(HubToken, tenant_id)
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def get_hub_token_row(session: Session, tenant_id: str) -> HubToken | None:
    return session.get(HubToken, tenant_id)
