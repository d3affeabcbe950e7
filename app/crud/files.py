"""Uploaded calibration files."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import UploadedFile


def get_file(session: Session, tenant_id: str, file_id: str) -> UploadedFile | None:
    return session.scalars(
        select(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.tenant_id == tenant_id)
    ).first()
