"""docker-compose.yml, the Dockerfiles and .dockerignore, checked statically (no Docker engine
runs here): services, builds, env, volumes, health checks, GPU reservation, start order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_stack_has_the_five_services(services):
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"postgres", "redis", "migrate", "api", "worker"}


def test_images_and_builds(services):
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    for name, dockerfile in (("migrate", "docker/api.Dockerfile"), ("api", "docker/api.Dockerfile"),
                             ("worker", "docker/worker.Dockerfile")):
        build = services[name]["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == dockerfile
        assert (ROOT / build["dockerfile"]).is_file()
    assert services["migrate"]["image"] == services["api"]["image"]


def test_commands(services):
    assert services["migrate"]["command"] == ["slimgpt", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["command"][:2] == ["slimgpt", "serve"]
    assert "0.0.0.0" in services["api"]["command"]
    assert services["worker"]["command"] == ["slimgpt", "worker"]


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_production_environment(services, name):
    env = services[name]["environment"]
    assert env["SLIMGPT_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["SLIMGPT_DATABASE_URL"]
    assert env["SLIMGPT_BROKER_URL"].startswith("redis://redis:6379")
    # The secret is a required variable from the environment / .env, never a literal.
    assert re.fullmatch(r"\$\{SLIMGPT_SECRET_KEY:\?.+\}", env["SLIMGPT_SECRET_KEY"])
    assert "${POSTGRES_PASSWORD:?" in env["SLIMGPT_DATABASE_URL"]
    # API and worker read one queue setting, so they cannot disagree.
    assert env["SLIMGPT_CELERY_QUEUE"] == "slimgpt"
    assert "SLIMGPT_QUEUE" not in env
    assert env["SLIMGPT_ARTIFACTS_DIR"] == "/data/artifacts"


def test_worker_env_has_the_hub_cache(services):
    env = services["worker"]["environment"]
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["SLIMGPT_HF_CACHE_DIR"].startswith(env["HF_HOME"])


def test_every_setting_name_in_compose_is_a_real_setting(services):
    from app.core.config import Settings
    from worker.settings import WorkerSettings

    known = {f"SLIMGPT_{n.upper()}" for n in Settings.model_fields}
    known |= {f"SLIMGPT_{n.upper()}" for n in WorkerSettings.model_fields}
    for name in ("migrate", "api", "worker"):
        used = {k for k in services[name]["environment"] if k.startswith("SLIMGPT_")}
        assert used <= known, used - known


def test_volumes(compose, services):
    assert {"pgdata", "artifacts", "uploads", "hf-cache"} <= set(compose["volumes"])
    mounts = {name: {v.split(":")[0]: v.split(":")[1] for v in s.get("volumes", [])}
              for name, s in services.items()}
    assert mounts["postgres"]["pgdata"] == "/var/lib/postgresql/data"
    # The worker writes artifacts the API serves, and reads uploads the API stored: same paths.
    for vol in ("artifacts", "uploads"):
        assert mounts["api"][vol] == mounts["worker"][vol]
    assert mounts["api"]["artifacts"] == services["api"]["environment"]["SLIMGPT_ARTIFACTS_DIR"]
    assert mounts["api"]["uploads"] == services["api"]["environment"]["SLIMGPT_UPLOADS_DIR"]
    assert mounts["worker"]["hf-cache"] == services["worker"]["environment"]["HF_HOME"]


def test_health_checks(services):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["ports"][0] == "${SLIMGPT_PORT:-8000}:8000"


def test_start_order(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in services["api"]


def test_api_dockerfile_is_slim_torch_free_and_non_root():
    ins = _instructions(API_DOCKERFILE)
    assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11-slim")
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert 'pip install ".[service]"' in runs
    assert "torch" not in runs.replace("find_spec('torch')", "")
    assert "[worker]" not in runs and "[core]" not in runs and "[demo]" not in runs
    copies = [a for i, a in ins if i == "COPY"]
    assert not any(a.startswith("worker") for a in copies)  # the worker package stays out
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(i == "HEALTHCHECK" and "/healthz" in a for i, a in ins)
    cmd = [a for i, a in ins if i == "CMD"][-1]
    assert '"slimgpt", "serve"' in cmd and "0.0.0.0" in cmd


def test_service_extra_does_not_pull_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for dep in project["dependencies"] + extras["service"]:
        name = re.split(r"[<>=\[; ]", dep, maxsplit=1)[0].lower()
        assert name not in {"torch", "transformers", "accelerate", "slimgpt-service"}, dep


def test_worker_dockerfile_is_cuda_with_the_worker_extra():
    ins = _instructions(WORKER_DOCKERFILE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    base = next(a for i, a in ins if i == "FROM")
    base = args.get(base.strip("${}"), base)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert 'pip install ".[worker]"' in runs
    assert "--index-url" in runs  # torch from the CUDA wheel index, before the project
    assert runs.index("TORCH_SPEC") < runs.index('".[worker]"')
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [a for i, a in ins if i == "CMD"][-1] == '["slimgpt", "worker"]'


def test_images_share_the_uid_for_the_shared_volumes():
    uid = re.compile(r"useradd[^&]*--uid (\d+)")
    assert uid.search(API_DOCKERFILE.read_text()).group(1) == \
        uid.search(WORKER_DOCKERFILE.read_text()).group(1)


def test_dockerignore_keeps_secrets_and_state_out_but_not_the_package():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert {".git", ".env", ".venv", ".slimgpt"} <= lines
    for needed in ("app", "worker", "slimgpt_core", "migrations", "pyproject.toml", "README.md"):
        assert needed not in lines


def test_env_example_names_the_required_variables():
    text = (ROOT / ".env.example").read_text()
    assert re.search(r"^SLIMGPT_SECRET_KEY=", text, re.MULTILINE)
    assert re.search(r"^POSTGRES_PASSWORD=", text, re.MULTILINE)
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_redis_keeps_an_append_only_file_on_a_volume(compose, services):
    # Defence in depth only: the dispatcher re-sends what Redis loses (docs/RELIABILITY.md).
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert "redis-data" in compose["volumes"]


def test_the_worker_gets_time_to_hand_its_job_back_on_stop(services):
    # SIGTERM: finish the current layer, checkpoint, hand back; about a minute for 70B.
    grace = services["worker"]["stop_grace_period"]
    seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
    assert seconds >= 90
