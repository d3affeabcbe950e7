"""Network-free stand-ins for huggingface_hub download functions, raising real Hub errors."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

SHA = "0123456789abcdef0123456789abcdef01234567"
LLAMA_CONFIG = '{"model_type": "llama", "num_hidden_layers": 2}'


def hub_http_error(status: int, *, error_code: str | None = None,
                   headers: dict[str, str] | None = None) -> HfHubHTTPError:
    """The exception huggingface_hub itself raises for this response (its own classifier)."""
    hdrs = dict(headers or {})
    if error_code:
        hdrs["X-Error-Code"] = error_code
    request = httpx2.Request("GET", "https://hub.test/api/models/org/model")
    response = httpx2.Response(status, headers=hdrs, request=request, json={"error": "x"})
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as exc:
        return exc
    raise AssertionError(f"status {status} did not raise")


class FakeHub:
    """One repo's files; a queue of errors to raise before answering."""

    def __init__(self, cache: Path, files: dict[str, str], sha: str = SHA) -> None:
        self.cache, self.files, self.sha = cache, files, sha
        self.errors: list[BaseException] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _maybe_fail(self) -> None:
        if self.errors:
            raise self.errors.pop(0)

    def model_info(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("model_info", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail()
        return SimpleNamespace(
            sha=self.sha, siblings=[SimpleNamespace(rfilename=n) for n in self.files]
        )

    def snapshot_download(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("snapshot_download", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail()
        folder = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / self.sha
        folder.mkdir(parents=True, exist_ok=True)
        patterns = kwargs.get("allow_patterns") or ["*"]
        for name, content in self.files.items():
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                (folder / name).write_text(content)
        return str(folder)
