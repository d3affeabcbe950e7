"""Uploaded calibration files."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import UploadedFile


def get_file(session: Session, tenant_id: str, file_id: str) -> UploadedFile | None:
    return session.scalars(
        select(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.tenant_id == tenant_id)
    ).first()


def list_files(session: Session, tenant_id: str, *, sha256: str | None = None,
               limit: int = 100) -> list[UploadedFile]:
    stmt = select(UploadedFile).where(UploadedFile.tenant_id == tenant_id)
    if sha256 is not None:
        stmt = stmt.where(UploadedFile.sha256 == sha256)
    stmt = stmt.order_by(UploadedFile.created_at.desc(), UploadedFile.id.desc()).limit(limit)
    return list(session.scalars(stmt))
