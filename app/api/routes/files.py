"""/v1/files: calibration text or jsonl, streamed to disk under a size limit."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.limits import UploadAllowance, check_upload_total, upload_allowance
from app.api.middleware import BodyTooLarge
from app.crud.files import get_file, list_files
from app.db.models import UploadedFile, new_id
from app.schemas import UUID_RE, ErrorOut, FileList, FileOut

log = logging.getLogger("slimgpt.api.files")
router = APIRouter(prefix="/v1/files", tags=["files"])

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
CHUNK = 64 * 1024


class _Checker:
    """Streams bytes to disk, hashing, counting, checking UTF-8 and jsonl lines as they pass."""

    def __init__(self, fmt: str, limit: int, allowance: UploadAllowance | None = None) -> None:
        self.fmt, self.limit = fmt, limit
        self.allowance = allowance  # the tenant's upload budget (app.api.limits)
        self.size = 0
        self.sha = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        # The unfinished last line, as the pieces that arrived: joined only once its newline
        # comes, so a long line costs linear time (re-scanning a growing string was quadratic).
        self.pending: list[str] = []
        self.line_no = 0
        self.records = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BodyTooLarge(self.limit)
        if self.allowance is not None and self.size > self.allowance.remaining:
            raise self.allowance.refusal(self.size)
        self.sha.update(chunk)
        try:
            text = self.decoder.decode(chunk)
        except UnicodeDecodeError:
            raise HTTPException(422, detail="file: is not UTF-8 text") from None
        if self.fmt == "jsonl":
            first, newline, rest = text.partition("\n")
            self.pending.append(first)
            if not newline:
                return
            self._line("".join(self.pending))
            *lines, last = rest.split("\n")
            for line in lines:
                self._line(line)
            self.pending = [last]

    def _line(self, line: str) -> None:
        self.line_no += 1
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise HTTPException(422, detail=f"file: line {self.line_no} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise HTTPException(
                422, detail=f"file: line {self.line_no} needs a string field \"text\"")
        self.records += 1

    def close(self) -> None:
        try:
            tail = self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise HTTPException(422, detail="file: is not UTF-8 text") from None
        if self.fmt == "jsonl":
            self._line("".join(self.pending) + tail)
            if self.records == 0:
                raise HTTPException(422, detail="file: has no jsonl records")
        elif self.size == 0:
            raise HTTPException(422, detail="file: is empty")


def _format_for(filename: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "jsonl" if filename.lower().endswith((".jsonl", ".ndjson")) else "text"


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut},
               429: {"model": ErrorOut, "description": "the tenant's upload bytes per 24 h "
                     "(SLIMGPT_UPLOAD_BYTES_PER_DAY) are spent; see Retry-After"}},
    summary="Upload a calibration or evaluation file (text, or jsonl with a `text` field per "
    "line)",
    description="Send `multipart/form-data` with a `file` field, or the raw UTF-8 text as the "
    "body (`?filename=name.jsonl` names it; a `.jsonl`/`.ndjson` name or `format=jsonl` makes "
    "it jsonl). The body is streamed to disk and cut off at SLIMGPT_MAX_UPLOAD_BYTES.",
    openapi_extra={"requestBody": {"required": True, "content": {
        "text/plain": {"schema": {"type": "string", "minLength": 1,
                                  "description": "UTF-8 text (jsonl: one JSON object with a "
                                  "`text` field per line)"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "the same, as raw bytes"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "UTF-8 text or jsonl"}}}},
    }}},
)
async def upload_file(
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    filename: Annotated[str | None, Query(max_length=255)] = None,
    format: Annotated[Literal["text", "jsonl"] | None, Query()] = None,
) -> FileOut:
    ctype = request.headers.get("content-type", "")
    # Database calls go to the threadpool: on the event loop a hung database would stall every
    # request of this process, /healthz included.
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() and not ctype.startswith("multipart/") else None
    allowance = await run_in_threadpool(upload_allowance, session, tenant.id, settings, declared)
    uploads = Path(settings.uploads_dir)  # type: ignore[arg-type]
    uploads.mkdir(parents=True, exist_ok=True)
    file_id = new_id()
    tmp = uploads / f"{file_id}.part"
    form = None
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, detail="file: multipart upload needs a `file` field")
            name = upload.filename or filename or "upload.txt"
            chunks: AsyncIterator[bytes] = _upload_chunks(upload)
        else:
            name = filename or "upload.txt"
            chunks = request.stream()
        fmt = _format_for(name, format)
        checker = _Checker(fmt, settings.max_upload_bytes, allowance)
        fh = await run_in_threadpool(open, tmp, "wb")  # disk I/O off the event loop
        try:
            async for chunk in chunks:
                if chunk:
                    checker.feed(chunk)
                    await run_in_threadpool(fh.write, chunk)
        finally:
            await run_in_threadpool(fh.close)
        checker.close()
        final = uploads / f"{file_id}{'.jsonl' if fmt == 'jsonl' else '.txt'}"
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if form is not None:
            await form.close()
    safe_name = _SAFE_NAME.sub("_", Path(name).name)[:255] or "upload"
    record = UploadedFile(id=file_id, tenant_id=tenant.id, filename=safe_name, format=fmt,
                          path=str(final.resolve()), size=checker.size,
                          sha256=checker.sha.hexdigest())

    def store() -> None:
        check_upload_total(session, tenant.id, settings, checker.size)  # others finished meanwhile
        session.add(record)
        session.commit()

    try:
        await run_in_threadpool(store)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    request.app.state.metrics.uploads.inc(checker.size)
    log.info("stored upload %s (%d bytes, %s)", file_id, checker.size, fmt)
    return _file_out(record)


def _file_out(f: UploadedFile) -> FileOut:
    return FileOut(id=f.id, filename=f.filename, format=f.format,  # type: ignore[arg-type]
                   size=f.size, sha256=f.sha256, created_at=f.created_at)


@router.get("", response_model=FileList, summary="The tenant's uploaded files, newest first")
def files_list(
    tenant: TenantDep,
    session: SessionDep,
    sha256: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$",
                                        description="only files with this content hash")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> FileList:
    return FileList(items=[_file_out(f) for f in list_files(session, tenant.id, sha256=sha256,
                                                             limit=limit)])


@router.get("/{file_id}", response_model=FileOut, responses={404: {"model": ErrorOut}},
            summary="An uploaded file's metadata")
def file_info(file_id: str, tenant: TenantDep, session: SessionDep) -> Any:
    f = get_file(session, tenant.id, file_id) if UUID_RE.match(file_id) else None
    if f is None:
        raise HTTPException(404, detail=f"file {file_id} not found")
    return _file_out(f)
