"""Job id syntax, shared by the task (untrusted broker input) and path-building code."""

from __future__ import annotations

import re

# UUIDs and similar. Anything else from a message is a bug or an attack; it must not reach the
# database, the logs, or a filesystem path (``../``).
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def is_valid_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and JOB_ID_RE.match(job_id) is not None and ".." not in job_id
