"""The server image's commands run for real without a Docker engine: the project installed as the image's
build stage installs it (not editable, no torch) into a fresh virtualenv, then served with compose's
environment, probed, streamed, asked over KServe and stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_deploy import COMPOSE, ROOT, SERVER_DF, copy_sources, resolved, stages

GENERATE = """
import json, sys
from rnnserve.client.lib import Client
with Client(sys.argv[1]) as c:
    model = next(m for m in c.list_models() if m.name == "shakespeare")  # a token model (models/ holds vector ones too)
    with c.session(model.name) as s:
        s.feed(model.vocab[0])
        chunks = list(s.generate_chunks(48, temperature=0.8, seed=7, chunk_tokens=8))
print(json.dumps({"model": model.name, "vocab": list(model.vocab), "chunks": [
    {"text": ch.text, "tokens": len(ch.tokens), "done": ch.done, "finish": ch.finish_reason} for ch in chunks]}))
"""


def build_context(tmp: Path) -> Path:
    """The server image's build context as its `build` stage COPYs it, under tmp."""
    ctx = tmp / "src"
    for sources, dest in copy_sources(stages(SERVER_DF)["build"]):
        for src in sources:
            target = ctx / dest / Path(src).name if dest.endswith("/") or len(sources) > 1 else ctx / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / src, target)
    return ctx


def image_install(ctx: Path, venv: Path) -> None:
    """Run the build stage's install.sh line against a fresh venv, with the stage's ENV, pip cache kept."""
    run = next(a for i, a in stages(SERVER_DF)["build"] if i == "RUN" and "install.sh" in a)
    m = re.search(r"(scripts/install\.sh) (\S+) (\S+)", run)
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env.update(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in stages(SERVER_DF)["build"] if i == "ENV")))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent)
    r = subprocess.run([str(ctx / m.group(1)), str(venv), m.group(3)], cwd=ctx, env=env, check=False,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float):
    """Retry `ready()` until it returns a truthy value; fail early with the log if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        assert proc.poll() is None, f"rnn-serve exited {proc.returncode} before {what}:\n{log.read_text()}"
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A fresh venv with the project installed as the server image installs it: not editable, no torch."""
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    image_install(build_context(tmp), venv)
    return venv


IMPORTS = """
import importlib.util, json, sys
tops = {n: importlib.util.find_spec(n) is not None for n in ("trainer", "server", "client", "inference")}
import rnnserve.server, rnnserve.server.app, rnnserve.server.main, rnnserve.client, rnnserve.v1.rnnserve_pb2
from rnnserve.server.kserve import descriptors
print(json.dumps({"tops": tops, "torch": "torch" in sys.modules, "desc": len(descriptors.descriptor_set()),
                  "where": rnnserve.server.__file__}))
"""


def test_installed_package_has_one_import_root(image_venv, tmp_path):
    """Installed (not editable), the project is `rnnserve.*` alone: no top-level trainer/server/client/
    inference that could clash with other PyPI packages, the KServe descriptors shipped as package data,
    and the server importable without torch."""
    r = subprocess.run([str(image_venv / "bin" / "python"), "-c", IMPORTS], cwd=tmp_path, check=False,
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tops"] == {"trainer": False, "server": False, "client": False, "inference": False}, out
    assert not out["torch"] and out["desc"] > 1000, out
    assert str(image_venv) in out["where"], out  # the installed copy, not this checkout


@pytest.mark.timeout(600)
def test_server_image_commands_live(image_venv, tmp_path, request):
    """Install as the image does (no torch), serve with compose's env, probe, stream, SIGTERM -> exit 0."""
    bin_dir = image_venv / "bin"
    torch = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], check=False,
                           capture_output=True, text=True)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr

    models = ROOT / "models"
    if not list(models.glob("*/*/model.json")):
        models = request.getfixturevalue("tiny_repo")  # models/ not shipped yet: the fixture repository
    server = resolved(COMPOSE)["services"]["server"]
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    env.update(server["environment"])
    port_file = tmp_path / "port.json"
    env.update(RNNSERVE_MODELS=str(models), RNNSERVE_HOST="127.0.0.1", RNNSERVE_PORT="0",
               RNNSERVE_METRICS_PORT="0", RNNSERVE_PORT_FILE=str(port_file), RNNSERVE_STATE_DIR=str(tmp_path / "state"))
    entrypoint = json.loads(dict(stages(SERVER_DF)["runtime"])["ENTRYPOINT"])
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(bin_dir / entrypoint[0]), *entrypoint[1:]], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        ports = wait_for("port file", lambda: port_file.exists() and json.loads(port_file.read_text()),
                         proc, log, 60)
        env["RNNSERVE_HEALTH_TARGET"] = f"127.0.0.1:{ports['port']}"
        probe = server["healthcheck"]["test"][1:]

        def healthy():
            r = subprocess.run(probe, env=env, check=False, capture_output=True, text=True, timeout=30)
            return r.returncode == 0 and r
        r = wait_for("SERVING from the healthcheck", healthy, proc, log, 60)
        assert "SERVING" in r.stdout, r.stdout

        gen = subprocess.run([str(bin_dir / "python"), "-c", GENERATE, env["RNNSERVE_HEALTH_TARGET"]],
                             env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr + log.read_text()
        out = json.loads(gen.stdout)
        chunks = out["chunks"]
        assert len(chunks) > 1 and chunks[-1]["done"] and sum(c["tokens"] for c in chunks) == 48, chunks
        assert set("".join(c["text"] for c in chunks)) <= set(out["vocab"])

        # the KServe endpoint answers from the installed package (its descriptors are package data)
        import numpy as np
        import tritonclient.grpc as tc

        kc = tc.InferenceServerClient(env["RNNSERVE_HEALTH_TARGET"])
        try:
            assert kc.get_model_metadata(out["model"]).name == out["model"]
            x = tc.InferInput("tokens", [1, 2], "INT64")
            x.set_data_from_numpy(np.zeros((1, 2), np.int64))
            assert kc.infer(out["model"], [x]).as_numpy("logits").shape == (1, 2, len(out["vocab"]))
        finally:
            kc.close()

        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10) as resp:
            assert resp.status == 200 and b"# HELP" in resp.read()

        grace = float(server["environment"]["RNNSERVE_GRACE"])
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace + 5)
        assert rc == 0, log.read_text()
        assert time.monotonic() - start < grace + 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
