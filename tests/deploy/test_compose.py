"""docker-compose.yml, docker/compose.local.yml, the Dockerfiles and .dockerignore, checked
statically: services, builds, env, volumes, health checks, one GPU per worker, start order.
tests/deploy/test_stack.py builds the images and runs the stack for real (`make stack-test`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
LOCAL_OVERRIDE = ROOT / "docker" / "compose.local.yml"
GPU_WORKERS = ["worker"] + [f"worker-gpu{i}" for i in range(1, 8)]
WORKERS = GPU_WORKERS + ["worker-cpu"]


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


def _default_services(services: dict) -> set[str]:
    return {name for name, s in services.items() if not s.get("profiles")}


def test_by_default_the_stack_is_the_five_services(services):
    assert _default_services(services) == {"postgres", "redis", "migrate", "api", "worker"}


def test_images_and_builds(services):
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    for name, dockerfile in (("migrate", "docker/api.Dockerfile"), ("api", "docker/api.Dockerfile"),
                             ("worker", "docker/worker.Dockerfile"),
                             ("worker-cpu", "docker/worker.Dockerfile")):
        build = services[name]["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == dockerfile
        assert (ROOT / build["dockerfile"]).is_file()
    assert services["migrate"]["image"] == services["api"]["image"]
    # The GPU workers share one image, built once by `worker`.
    assert {services[w]["image"] for w in GPU_WORKERS} == {services["worker"]["image"]}
    assert services["worker-cpu"]["image"] != services["worker"]["image"]


def test_the_cpu_worker_is_the_same_dockerfile_with_a_cpu_base_and_torch(services):
    args = services["worker-cpu"]["build"]["args"]
    assert args["BASE_IMAGE"].startswith("python:3.11")
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    assert "deploy" not in services["worker-cpu"]


def test_commands(services):
    assert services["migrate"]["command"] == ["slimgpt", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["command"][:2] == ["slimgpt", "serve"]
    assert "0.0.0.0" in services["api"]["command"]
    for name in WORKERS:
        assert services[name]["command"] == ["slimgpt", "worker"]


@pytest.mark.parametrize("name", ["migrate", "api", *WORKERS])
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


@pytest.mark.parametrize("name", WORKERS)
def test_worker_env_has_the_hub_cache(services, name):
    env = services[name]["environment"]
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["SLIMGPT_HF_CACHE_DIR"].startswith(env["HF_HOME"])


def test_every_setting_name_in_compose_is_a_real_setting(services):
    from app.core.config import Settings
    from worker.settings import WorkerSettings

    known = {f"SLIMGPT_{n.upper()}" for n in Settings.model_fields}
    known |= {f"SLIMGPT_{n.upper()}" for n in WorkerSettings.model_fields}
    for name in ("migrate", "api", *WORKERS):
        used = {k for k in services[name]["environment"] if k.startswith("SLIMGPT_")}
        assert used <= known, used - known


def test_volumes(compose, services):
    assert {"pgdata", "artifacts", "uploads", "hf-cache"} <= set(compose["volumes"])
    mounts = {name: {v.split(":")[0]: v.split(":")[1] for v in s.get("volumes", [])}
              for name, s in services.items()}
    assert mounts["postgres"]["pgdata"] == "/var/lib/postgresql/data"
    # A worker writes artifacts the API serves, and reads uploads the API stored: same paths.
    for name in WORKERS:
        for vol in ("artifacts", "uploads"):
            assert mounts["api"][vol] == mounts[name][vol]
        assert mounts[name]["hf-cache"] == services[name]["environment"]["HF_HOME"]
    assert mounts["api"]["artifacts"] == services["api"]["environment"]["SLIMGPT_ARTIFACTS_DIR"]
    assert mounts["api"]["uploads"] == services["api"]["environment"]["SLIMGPT_UPLOADS_DIR"]


def test_health_checks(services):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["ports"][0] == "${SLIMGPT_PORT:-8000}:8000"
    for name in WORKERS:
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.liveness"]


def test_only_the_api_publishes_a_port_beyond_the_loopback(services):
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert "api" in published
    for name in ("postgres", "redis", *WORKERS):
        assert name not in published
    for name, ports in published.items():
        if name != "api":
            assert all(p.startswith("127.0.0.1:") for p in ports), (name, ports)


def test_start_order(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", *WORKERS):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"


def _gpu_ids(service: dict) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    # `count: 1` would give every worker the same GPU; each one names its own.
    assert "count" not in devices[0]
    return devices[0]["device_ids"]


def test_each_gpu_worker_is_pinned_to_its_own_gpu(services):
    ids = [_gpu_ids(services[name]) for name in GPU_WORKERS]
    assert ids == [[str(i)] for i in range(8)]
    assert "deploy" not in services["api"]


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_a_gpu_profile_starts_one_worker_per_gpu(services, gpus):
    profile = f"gpus-{gpus}"
    started = {name for name, s in services.items()
               if not s.get("profiles") or profile in s["profiles"]}
    workers = sorted(name for name in started if "deploy" in services[name])
    assert sorted(_gpu_ids(services[w])[0] for w in workers) == [str(i) for i in range(gpus)]


def _base_image(ins: list[tuple[str, str]], arg: str) -> str:
    """The default of the build argument that the (only) FROM names."""
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == [f"${{{arg}}}"]
    return args[arg]


def test_api_dockerfile_is_slim_torch_free_and_non_root():
    ins = _instructions(API_DOCKERFILE)
    assert _base_image(ins, "PYTHON_IMAGE").startswith("python:3.11-slim")
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


def test_worker_dockerfile_is_cuda_by_default_with_the_worker_extra():
    ins = _instructions(WORKER_DOCKERFILE)
    base = _base_image(ins, "BASE_IMAGE")
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    assert args["TORCH_INDEX_URL"].endswith("/cu128")  # the CUDA of the default base
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert 'pip install ".[worker]"' in runs
    assert "--index-url" in runs  # torch from its own wheel index, before the project
    assert runs.index("TORCH_SPEC") < runs.index('".[worker]"')
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(i == "HEALTHCHECK" and "worker.liveness" in a for i, a in ins)
    assert [a for i, a in ins if i == "CMD"][-1] == '["slimgpt", "worker"]'


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE])
def test_no_secret_is_baked_into_an_image(path):
    for instruction, args in _instructions(path):
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|API_KEY", args, re.IGNORECASE), args


def test_the_local_override_swaps_images_and_the_worker_only():
    override = yaml.safe_load(LOCAL_OVERRIDE.read_text())["services"]
    script = (ROOT / "docker" / "local-images.sh").read_text()
    for name, service in override.items():
        assert set(service) <= {"image", "volumes", "profiles"}, name
        if "image" in service:
            assert service["image"] in script  # built by docker/local-images.sh
    # No GPU on such a machine: the GPU worker is off unless asked for, the CPU one runs.
    assert override["worker"]["profiles"] == ["gpu"]
    assert override["worker-cpu"]["image"].startswith("slimgpt-worker:cpu")
    for name in ("api", "worker-cpu"):
        assert any(v.endswith(":/models:ro") for v in override[name]["volumes"])


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


@pytest.mark.parametrize("name", WORKERS)
def test_the_worker_gets_time_to_hand_its_job_back_on_stop(services, name):
    # SIGTERM: finish the current layer, checkpoint, hand back; about a minute for 70B.
    grace = services[name]["stop_grace_period"]
    seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
    assert seconds >= 90
