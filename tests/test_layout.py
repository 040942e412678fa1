"""The house rules of the code's layout, read from the import statements themselves (those inside
functions included): no import cycles, the server never imports torch or the trainer, the client is
free of both, and the ONNX contract is defined once, on the server side."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"trainer": "rnnserve.trainer", "server": "rnnserve.server", "client": "rnnserve.client",
            "protos/rnnserve": "rnnserve"}


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    out = {}
    for folder, root in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "protos/rnnserve" and parts and parts[0] != "v1":
                continue
            out[".".join([root, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports (any depth in the file), resolved to import names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for a in node.names:  # `from . import x` may name a submodule
                if f"{target}.{a.name}" in known:
                    found.add(f"{target}.{a.name}")
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between our modules, every import of each module)."""
    mods = modules()
    known = set(mods)
    every = {m: imports(m, p, known) for m, p in mods.items()}
    edges = {m: {i for i in imps if i in known and i != m} for m, imps in every.items()}
    return edges, every


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package() -> None:
    edges = graph()[0]
    assert "rnnserve.server.contract" in edges and "rnnserve.trainer.export" in edges
    assert "rnnserve.server.contract" in edges["rnnserve.trainer.export"]  # the exporter checks with it
    assert "rnnserve.server.kserve.descriptors" in edges["rnnserve.server.kserve.servicer"]


def test_no_import_cycles() -> None:
    found = cycles(graph()[0])
    assert not found, f"import cycles: {found}"


def test_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_server_and_client_stay_light() -> None:
    """The server imports neither torch, onnx nor the trainer; the client imports none of those nor the server."""
    _, every = graph()
    for mod, imps in every.items():
        tops = {i.split(".")[0] for i in imps} | {".".join(i.split(".")[:2]) for i in imps}
        if mod.startswith("rnnserve.server"):
            assert not tops & {"torch", "onnx", "rnnserve.trainer"}, (mod, sorted(imps))
        if mod.startswith("rnnserve.client"):
            assert not tops & {"torch", "onnx", "onnxruntime", "rnnserve.trainer", "rnnserve.server"}, mod


def test_the_contract_is_defined_once() -> None:
    """File names, checksums and the model.json schema live in server/contract/ alone."""
    needles = ('"model.json"', '"model.onnx"', '"sequence.onnx"', "def sha256", "REQUIRED_KEYS =")
    for folder in ("server", "trainer"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.parent.name == "contract":
                continue
            text = path.read_text()
            hits = [n for n in needles if n in text]
            assert not hits, f"{path.relative_to(ROOT)} repeats contract details: {hits}"
