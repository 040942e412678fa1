"""The scale-out deployment files without a Docker engine or a cluster: the compose `scale` profile
(docker-compose.scale.yml + docker/haproxy.cfg) against the Compose spec, haproxy -c and each other, and
the Kubernetes sketch (deploy/k8s) against the Kubernetes schemas (kubernetes-validate) and each other."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from rnnserve.client.core import ROUTING_HEADER
from test_deploy import SCHEMA, interpolate, server_env_names

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
SCALE = ROOT / "docker-compose.scale.yml"
HAPROXY_CFG = ROOT / "docker" / "haproxy.cfg"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.37.0"


# -- helpers -------------------------------------------------------------------------------------------------
class Reset:
    """Compose's `!reset` (drop what the files before set) or `!override` (replace it whole)."""

    def __init__(self, value: object, drop: bool) -> None:
        self.value, self.drop = value, drop


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's merge tags."""


for _tag, _drop in (("!reset", True), ("!override", False)):
    ComposeLoader.add_constructor(_tag, lambda loader, node, drop=_drop: Reset(
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else
        loader.construct_scalar(node), drop))


def load(path: Path) -> dict:
    """A compose file as data, its merge tags kept as Reset markers."""
    return yaml.load(path.read_text(), ComposeLoader)  # a SafeLoader subclass: no arbitrary objects


def plain(data: object) -> object:
    """The file as Compose validates it on its own: each tagged value as written."""
    if isinstance(data, Reset):
        return plain(data.value)
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


def merge(base: dict, over: dict) -> dict:
    """Compose's merge of an override: mappings merge, `!reset` drops, `!override` and the rest replace."""
    out = dict(base)
    for key, val in over.items():
        if isinstance(val, Reset):
            out.pop(key, None)
            if not val.drop:
                out[key] = plain(val.value)
        elif isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], val)
        else:
            out[key] = plain(val)
    return out


def merged() -> dict:
    """docker-compose.yml with the scale override, interpolated with no variables set."""
    return interpolate(merge(load(BASE), load(SCALE)), {})


def errors(data: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def haproxy() -> str | None:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return found if os.access(found, os.X_OK) else None


def haproxy_check(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
    """`haproxy -c` accepts the configuration (skip without haproxy)."""
    binary = haproxy()
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy): the config is not run by haproxy -c")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    r = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, check=False,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout + r.stderr


def backend_lines(text: str) -> dict[str, str]:
    """The settings of a HAProxy config the balancing depends on, by keyword."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("balance", "hash-type", "bind", "server-template", "nameserver"):
            out[words[0]] = line.strip()
    return out


def compose_binary() -> list[str] | None:
    """`docker compose` (the plugin) or a standalone docker-compose (PATH, or beside this Python)."""
    docker = shutil.which("docker")
    plugin = [docker, "compose"] if docker else []
    if plugin and subprocess.run([*plugin, "version"], capture_output=True, check=False).returncode == 0:
        return plugin
    for cand in (shutil.which("docker-compose"), str(Path(sys.executable).parent / "docker-compose")):
        if cand and os.access(cand, os.X_OK):
            return [cand]
    return None


# -- compose: the scale profile ------------------------------------------------------------------------------
def test_scale_override_validates_against_the_compose_spec() -> None:
    """The override alone, and merged onto docker-compose.yml (raw and interpolated), against the spec."""
    assert not errors(plain(load(SCALE)))
    raw = merge(load(BASE), load(SCALE))
    assert not errors(raw)
    assert not errors(interpolate(raw, {}))


def test_scale_services_reference_each_other() -> None:
    """Replicas publish nothing and use Redis; Redis and the balancer are the profile's; the balancer
    publishes 8001 and reaches the replicas by service name and port; images are pinned to a release line."""
    c = merged()
    s, redis, lb = c["services"]["server"], c["services"]["redis"], c["services"]["balancer"]
    assert "profiles" not in s and redis["profiles"] == ["scale"] and lb["profiles"] == ["scale"]
    assert "ports" not in s, "N replicas cannot publish one host port: the override must reset them"
    assert "container_name" not in s, "a fixed container name forbids --scale"
    env = s["environment"]
    m = re.fullmatch(r"redis://([\w.-]+):(\d+)/(\d+)", env["RNNSERVE_SESSION_STORE"])
    assert m and m.group(1) == "redis" and m.group(2) == "6379", env["RNNSERVE_SESSION_STORE"]
    assert s["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in redis["healthcheck"]["test"]
    cmd = redis["command"]
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis" in c["volumes"]
    assert lb["ports"] == ["8001:8001"]
    mounts = dict(v.split(":")[:2] for v in lb["volumes"])
    assert mounts["./docker/haproxy.cfg"] == "/usr/local/etc/haproxy/haproxy.cfg"
    assert lb["depends_on"] == ["server"]
    assert re.fullmatch(r"redis:\d+\.\d+-alpine", redis["image"]), redis["image"]
    assert re.fullmatch(r"haproxy:\d+\.\d+-alpine", lb["image"]), lb["image"]
    cfg = backend_lines(HAPROXY_CFG.read_text())
    assert cfg["bind"].split()[1] == f":{lb['ports'][0].split(':')[-1]}" and "proto h2" in cfg["bind"]
    template = cfg["server-template"].split()
    assert template[3] == f"server:{env['RNNSERVE_PORT']}", template  # the service: one address per replica
    assert {"proto", "h2", "check", "resolvers", "docker", "init-addr", "none"} <= set(template)
    assert cfg["nameserver"].split()[2] == "127.0.0.11:53"  # Docker's embedded DNS
    assert cfg["balance"] == f"balance hdr({ROUTING_HEADER})" and cfg["hash-type"] == "hash-type consistent"
    assert set(env) <= server_env_names() | {"RNNSERVE_HEALTH_TARGET"}


def test_haproxy_accepts_the_compose_balancer_config(tmp_path: Path) -> None:
    haproxy_check(HAPROXY_CFG.read_text(), tmp_path)


def test_docker_compose_config_accepts_the_scale_profile() -> None:
    """`docker compose config` (no engine needed) on both files with the profile: the merged model has no
    published replica port and the three services."""
    cmd = compose_binary()
    if cmd is None:
        pytest.skip("no `docker compose` plugin or docker-compose binary; the JSON-schema tests cover it")
    r = subprocess.run([*cmd, "-f", str(BASE), "-f", str(SCALE), "--profile", "scale", "config", "--format",
                        "json"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)
    assert {"server", "redis", "balancer"} <= set(model["services"])
    assert not model["services"]["server"].get("ports")
    assert [p["published"] for p in model["services"]["balancer"]["ports"]] == ["8001"]


# -- Kubernetes ----------------------------------------------------------------------------------------------
def manifests() -> dict[tuple[str, str], dict]:
    """Every object of deploy/k8s/*.yaml by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_kubernetes_manifests_validate() -> None:
    """Every object against the Kubernetes 1.37 schemas, strictly (an unknown field fails); the validator
    does reject a misspelt field."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    objs = manifests()
    kinds = {"Deployment", "Service", "ConfigMap", "StatefulSet", "PersistentVolumeClaim"}
    assert {k for k, _ in objs} >= kinds
    for (kind, name), doc in objs.items():
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{kind}/{name}: {e}")
    broken = yaml.safe_load(yaml.safe_dump(objs[("Deployment", "rnnserve")]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_kubernetes_objects_reference_each_other() -> None:
    """Services select their pods by port name; the replicas reach Redis by its Service and probe the gRPC
    health service on their own port; the balancer's config resolves the headless Service and hashes on the
    client's header; names, claims and grace periods line up."""
    o = manifests()
    dep, headless = o[("Deployment", "rnnserve")], o[("Service", "rnnserve-replicas")]
    lb, lb_svc = o[("Deployment", "rnnserve-balancer")], o[("Service", "rnnserve")]
    redis, redis_svc = o[("StatefulSet", "rnnserve-redis")], o[("Service", "rnnserve-redis")]
    server = next(c for c in _pod(dep)["containers"] if c["name"] == "rnn-serve")
    env = _env(server)
    assert set(env) <= server_env_names(), f"unknown settings: {set(env) - server_env_names()}"
    port = int(env["RNNSERVE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == port and ports["metrics"] == int(env["RNNSERVE_METRICS_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == port, probe  # grpc.health.v1, the standard health service
    assert env["RNNSERVE_HOST"] == "0.0.0.0" and env["RNNSERVE_METRICS_HOST"] == "0.0.0.0"
    pause = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert _pod(dep)["terminationGracePeriodSeconds"] > float(env["RNNSERVE_GRACE"]) + pause + 5
    # Redis: by Service name and port
    m = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", env["RNNSERVE_SESSION_STORE"])
    assert m and m.group(1) == redis_svc["metadata"]["name"], env["RNNSERVE_SESSION_STORE"]
    assert int(m.group(2)) == redis_svc["spec"]["ports"][0]["port"] and _selects(redis_svc, redis)
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    # the replicas: a headless Service over the Deployment's pods
    assert headless["spec"]["clusterIP"] == "None" and _selects(headless, dep)
    assert {p["targetPort"] for p in headless["spec"]["ports"]} <= set(ports)
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in _pod(dep)["volumes"]
                 if "persistentVolumeClaim" in v)
    assert ("PersistentVolumeClaim", claim) in o
    # the balancer: its Service, its ConfigMap, and the config itself
    assert _selects(lb_svc, lb) and not _selects(lb_svc, dep)
    haproxy_c = _pod(lb)["containers"][0]
    assert lb_svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in haproxy_c["ports"]}
    cm_name = next(v["configMap"]["name"] for v in _pod(lb)["volumes"] if "configMap" in v)
    cfg_text = o[("ConfigMap", cm_name)]["data"]["haproxy.cfg"]
    cfg = backend_lines(cfg_text)
    assert cfg["balance"] == f"balance hdr({ROUTING_HEADER})" and cfg["hash-type"] == "hash-type consistent"
    target = cfg["server-template"].split()[3].strip('"')
    assert target == f"{headless['metadata']['name']}.${{POD_NAMESPACE}}.svc.cluster.local:{port}", target
    assert "POD_NAMESPACE" in {e["name"] for e in haproxy_c["env"]}
    assert cfg["bind"].split()[1] == f":{haproxy_c['ports'][0]['containerPort']}"
    assert re.fullmatch(r"haproxy:\d+\.\d+-alpine", haproxy_c["image"]) and server["image"].count(":") == 1


def test_haproxy_accepts_the_kubernetes_balancer_config(tmp_path: Path) -> None:
    """The ConfigMap's haproxy.cfg, with the namespace the Deployment passes in."""
    haproxy_check(manifests()[("ConfigMap", "rnnserve-haproxy")]["data"]["haproxy.cfg"], tmp_path,
                  {"POD_NAMESPACE": "default"})
