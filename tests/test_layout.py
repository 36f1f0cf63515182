"""The shape of the code: no import cycle anywhere in the package, and the light paths stay light."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_bridge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports: top-level, inside functions and under TYPE_CHECKING alike."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_of_the_package_imports_itself_back():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = imports(modules)
    assert "qlora_bridge.api" in graph["qlora_bridge.stages.smoke"]  # the walk sees imports at all
    assert "qlora_bridge.demo" in graph["qlora_bridge.project"]  # and those inside functions
    assert cycles(graph) == []


def test_imports_run_downward_instruments_below_the_api_and_both_below_the_stages():
    """measure/ and api/ never import a stage, and measure/ never imports the API (which re-exports what the
    instruments define): an instrument that needs "the model that was trained" finds it in models.py (issue 36)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = imports(modules)
    layer = lambda m: next((pkg for pkg in ("measure", "api", "stages") if m.startswith(f"qlora_bridge.{pkg}")), None)
    forbidden = {("measure", "stages"), ("api", "stages"), ("measure", "api")}
    upward = sorted((a, b) for a, targets in graph.items() for b in targets if (layer(a), layer(b)) in forbidden)
    assert "qlora_bridge.measure.scores" in graph["qlora_bridge.api.types"]  # the walk sees the package's imports
    assert upward == []


def test_first_party_plugins_are_distributions_that_use_only_the_public_api():
    """Each folder of plugins/ is an installable distribution with its entry points in the group an in-house plugin
    uses, and its modules import nothing of the core but qlora_bridge.api (their own packages aside)."""
    import tomllib

    from qlora_bridge.host import ENTRY_POINT_GROUP, FIRST_PARTY

    root = PACKAGE.parent / "plugins"
    declared, reached = {}, {}
    for project in sorted(root.glob("*/pyproject.toml")):
        meta = tomllib.loads(project.read_text())
        for name, module in meta["project"]["entry-points"][ENTRY_POINT_GROUP].items():
            declared[name] = project.parent.relative_to(PACKAGE.parent).as_posix()
        for path in project.parent.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    if name.split(".")[0] == "qlora_bridge":
                        reached.setdefault(name, set()).add(path.relative_to(root).as_posix())
    assert declared == FIRST_PARTY  # what the host reports missing is what plugins/ installs
    assert "qlora_bridge.api" in reached  # the walk sees the plugins' imports
    assert {m: sorted(f) for m, f in reached.items() if m not in ("qlora_bridge.api", "qlora_bridge.api.safetensors")} \
        == {}
    assert not (PACKAGE / "default_plugins").exists()


def test_the_walk_finds_a_cycle_through_a_function_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_project_manifest_signing_and_plugin_host_load_no_heavy_library(tmp_path):
    """`init`, `verify` and `plugins` must not pay for torch: reading a project file, verifying a folder and
    listing the plugins import none of the heavy libraries (the built-in plugins import theirs when they work)."""
    code = """
import json, sys
import qlora_bridge.api, qlora_bridge.host, qlora_bridge.manifest, qlora_bridge.project, qlora_bridge.signing
qlora_bridge.project.find()
registry = qlora_bridge.host.load_plugins()
assert not registry.problems, registry.problems
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "bitsandbytes", "peft"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []
