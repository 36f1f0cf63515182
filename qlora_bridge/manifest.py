"""The manifest every export folder carries: what went in, what came out, how, and what was verified."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import BridgeError
from .files import sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "model.sig"
SMOKE_REPORT = "smoke-report.md"  # written by `smoke` beside the artifact
SCHEMA_VERSION = 1
NOT_LISTED = {MANIFEST, SIGNATURE}  # the manifest cannot list itself; the signature is written after it


def schema_path(version: int = SCHEMA_VERSION) -> Path:
    here = Path(__file__).resolve().parent
    name = f"manifest-v{version}.schema.json"
    for candidate in (here / "schemas" / name, here.parent / "manifests" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"manifest schema {name} is missing from this installation")


def output_files(folder: Path) -> list[dict]:
    """Every file in the folder (recursively) with its size and sha256, by relative POSIX path."""
    folder = Path(folder)
    entries = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in NOT_LISTED:
            entries.append(output_entry(folder, rel))
    return entries


def output_entry(folder: Path, rel: str) -> dict:
    path = Path(folder) / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}


def environment() -> dict:
    """Python, platform and the versions of the libraries that shape the results: those qlora-bridge pins exactly,
    its extras included (the engines of the built-in plugins), as installed; an in-house plugin names its own
    engines' versions in its ExportResult.settings."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        pinned = [r for r in requires("qlora-bridge") or [] if "==" in r.split(";")[0] and "'test'" not in r]
    except PackageNotFoundError:  # run from a source tree that was never installed: its pyproject pins the same
        pinned = source_tree_pins()
    libs = {}
    for req in pinned:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "libraries": libs}


def source_tree_pins() -> list[str]:
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = [r for name, reqs in project.get("optional-dependencies", {}).items() if name != "test" for r in reqs]
    return [r for r in project.get("dependencies", []) + extras if "==" in r.split(";")[0]]


def build(folder: Path, *, target: str, fmt: str, quant: str | None, plugin: dict, settings: dict, checks: dict,
          inputs: dict) -> dict:
    return {
        "schema": "qlora-bridge/manifest",
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "qlora-bridge", "version": __version__},
        "plugin": plugin,
        "inputs": inputs,
        "export": {"target": target, "format": fmt, "quant": quant, "settings": settings, "checks": checks},
        "environment": environment(),
        "outputs": output_files(folder),
        "verification": {},
    }


def write(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def read(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BridgeError("the folder has no manifest.json", file=folder, fix="export it with qlora-bridge")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BridgeError(f"manifest.json is not valid JSON ({e})", file=path, fix="re-export the folder") from None


def unsafe_paths(manifest: dict) -> list[str]:
    """Output paths that are absolute or climb out of the folder."""
    bad = []
    for entry in manifest.get("outputs", []):
        p = PurePosixPath(str(entry.get("path", "")))
        if p.is_absolute() or ".." in p.parts or "\\" in str(p) or not str(p) or str(p).startswith("~"):
            bad.append(str(entry.get("path")))
    return bad


def compare_outputs(folder: Path, manifest: dict) -> tuple[list[str], dict]:
    """Problems between the manifest's outputs and the folder's files, and the files present (by path)."""
    unsafe = unsafe_paths(manifest)
    problems = [f"manifest names a path outside the folder: {p}" for p in unsafe]
    listed = {e["path"]: e for e in manifest.get("outputs", [])
              if isinstance(e, dict) and "path" in e and e["path"] not in unsafe}
    present = {e["path"]: e for e in output_files(folder)}
    for path, entry in listed.items():
        if path not in present:
            problems.append(f"manifest lists {path}, which is missing")
        elif (present[path]["sha256"], present[path]["size"]) != (entry.get("sha256"), entry.get("size")):
            problems.append(f"manifest digest mismatch: {path} is not the file the manifest describes")
    problems += [f"file not in the manifest: {p}" for p in present if p not in listed]
    return problems, present


def schema_errors(manifest: dict) -> list[str]:
    import jsonschema

    version = manifest.get("schema_version")
    try:
        schema = json.loads(schema_path(version if isinstance(version, int) else SCHEMA_VERSION).read_text())
    except FileNotFoundError:
        return [f"schema_version: unknown version {version!r}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(manifest)]
