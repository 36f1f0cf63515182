"""The plugin host: discovery, registration, conflicts, and the registry of exporters, serving adapters and checks.

Two sources, one manager: installed packages exposing the entry-point group `qlora_bridge` (the first-party
plugins in plugins/ among them, each its own distribution, loaded exactly as an in-house one), and local modules
named by QLORA_BRIDGE_PLUGINS or --plugin (module names or .py paths, separated by os.pathsep). A plugin that fails
to import or to register is recorded with its error and the others keep working; two plugins claiming one target or
backend make that name unusable until one goes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import pluggy

from . import __version__
from .api import PLUGIN_API, SUPPORTED_PLUGIN_APIS, Exporter, ServingAdapter, SmokeCheck, check_options, hookspecs
from .errors import BridgeError

ENTRY_POINT_GROUP = "qlora_bridge"
ENV_VAR = "QLORA_BRIDGE_PLUGINS"
# The first-party plugins and the folder of the checkout each is installed from (`make` installs them all): the core
# runs without any of them, and `plugins` names one that is missing with the command that installs it.
FIRST_PARTY = {"gguf": "plugins/llamacpp", "llamacpp_server": "plugins/llamacpp", "gptq_awq": "plugins/gptq_awq",
               "safetensors_export": "plugins/safetensors", "smoke_checks": "plugins/smoke_checks",
               "vllm_server": "plugins/vllm"}
KINDS = {"register_exporters": (Exporter, "target"), "register_servers": (ServingAdapter, "backend"),
         "register_smoke_checks": (SmokeCheck, "name")}


@dataclass
class PluginInfo:
    name: str
    source: str  # entry point (the first-party plugins too) or local
    origin: str  # the file, module or distribution it came from
    version: str
    error: str | None = None
    provides: list[str] = field(default_factory=list)  # "exporter gguf", "server llamacpp", ...


@dataclass(frozen=True)
class ResolvedExport:
    """One export decided once: what the command line, the pipeline, plan and compare pass down, and what
    stages.export.write runs without deriving any of it again.

        registry.resolve_export("gguf", options={"imatrix": "off"})
        # ResolvedExport(target="gguf", quant="Q4_K_M", options={"imatrix": "off"}, folder="export-gguf-Q4_K_M", ...)
    """
    target: str
    exporter: Exporter
    plugin: PluginInfo
    quant: str | None  # None: the target takes no quant
    options: dict[str, str]  # what the exporter reads, checked against what it declares
    folder: str  # the output folder's default name


@dataclass
class Registry:
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    items: dict[str, dict[str, tuple[object, str]]] = field(
        default_factory=lambda: {hook: {} for hook in KINDS})  # hook -> key -> (registration, plugin name)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        broken = [f"plugin '{p.name}' ({p.source}: {p.origin}) is broken: {p.error}"
                  for p in self.plugins.values() if p.error]
        clashes = [f"{KINDS[hook][0].__name__.lower()} '{key}' is claimed by plugins "
                   f"{' and '.join(repr(n) for n in names)}" for (hook, key), names in self.conflicts.items()]
        return broken + clashes

    @property
    def missing(self) -> list[str]:
        """The first-party plugins that are not installed, each with the command that installs it."""
        return [f"{name}: pip install -e {folder} (in the qlora-bridge checkout; `make` installs every one)"
                for name, folder in FIRST_PARTY.items() if name not in self.plugins]

    def _get(self, hook: str, key: str, what: str, flag: str):
        if (hook, key) in self.conflicts:
            names = " and ".join(repr(n) for n in self.conflicts[(hook, key)])
            raise BridgeError(f"{what} '{key}' is claimed by two plugins: {names}", field=flag,
                              fix="uninstall or unload one of them (see `qlora-bridge plugins`)")
        if key not in self.items[hook]:
            known = ", ".join(sorted(self.items[hook])) or "none"
            broken = [p.name for p in self.plugins.values() if p.error]
            hint = f"; broken plugins that may have offered it: {', '.join(broken)}" if broken else ""
            hint += f"; first-party plugins not installed: {', '.join(self.missing)}" if self.missing else ""
            raise BridgeError(f"no {what} named '{key}' (available: {known}{hint})", field=flag,
                              fix="pick one of the available names, or install the plugin that provides it")
        return self.items[hook][key]

    def exporter(self, target: str) -> tuple[Exporter, PluginInfo]:
        reg, plugin = self._get("register_exporters", target, "export target", "--target")
        return reg, self.plugins[plugin]

    def resolve_export(self, target: str, *, quant: str | None = None, options: dict[str, str] | None = None,
                       spec=None) -> ResolvedExport:
        """The export of `target`: the quant and options given (a command's flags) over those of its project table
        `spec` (a project.ExportSpec, checked here, its errors naming its file and line) over the exporter's
        defaults (its first quant type)."""
        found = spec.check(self) if spec is not None else None
        exporter, plugin = found or self.exporter(target)
        quant = quant or (spec.quant if spec else None) or (exporter.quant_types[0] if exporter.quant_types else None)
        if exporter.quant_types and quant not in exporter.quant_types:
            raise BridgeError(f"export target '{target}' does not offer --quant {quant}", field="--quant",
                              fix=f"use one of {', '.join(exporter.quant_types)}")
        options = {**(spec.export_options(exporter) if spec else {}), **(options or {})}
        check_options(options, exporter.options, f"export target '{target}'")
        folder = (spec.name if spec else None) or f"export-{target}" + (f"-{quant}" if quant else "")
        return ResolvedExport(target, exporter, plugin, quant, options, folder)

    def server(self, backend: str) -> tuple[ServingAdapter, PluginInfo]:
        reg, plugin = self._get("register_servers", backend, "serving backend", "--backend")
        return reg, self.plugins[plugin]

    def smoke_checks(self) -> list[tuple[SmokeCheck, PluginInfo]]:
        return [(reg, self.plugins[p]) for key, (reg, p) in self.items["register_smoke_checks"].items()
                if ("register_smoke_checks", key) not in self.conflicts]

    def backend_for(self, fmt: str) -> str:
        """The first registered backend that serves this artifact format."""
        for key, (adapter, _) in self.items["register_servers"].items():
            if fmt in adapter.formats and ("register_servers", key) not in self.conflicts:
                return key
        raise BridgeError(f"no serving backend serves {fmt} artifacts", field="--backend",
                          fix="install a plugin that serves this format (see `qlora-bridge plugins`)")


def _import_path(path: Path):
    """Import a local plugin from a .py file or a package folder (whose modules may import each other relatively)."""
    name = f"qlora_bridge_plugin_{path.stem}"
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _candidates(local: list[str]):
    """(name, source, origin, loader, version) for every plugin to load, the installed ones by name (registration
    order decides which backend serves a format two of them serve)."""
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        yield ep.name, "entry point", f"{dist} ({ep.value})", ep.load, version
    env = [v for v in os.environ.get(ENV_VAR, "").split(os.pathsep) if v]
    for spec in env + list(local):
        is_path = spec.endswith(".py") or os.sep in spec or Path(spec).is_dir()
        name = Path(spec).stem if is_path else spec
        loader = (lambda s=spec: _import_path(Path(s))) if is_path else (lambda s=spec: importlib.import_module(s))
        yield name, "local", spec, loader, None


def load_plugins(local: list[str] = ()) -> Registry:
    pm = pluggy.PluginManager("qlora_bridge")
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    for name, source, origin, loader, version in _candidates(list(local)):
        if name in reg.plugins:
            name = f"{name} ({source})"
        info = PluginInfo(name, source, origin, version or "?")
        reg.plugins[name] = info
        try:
            module = loader()
            info.version = version or str(getattr(module, "__version__", "?"))
            api = getattr(module, "PLUGIN_API", None)
            if api is None:
                raise BridgeError("it does not declare PLUGIN_API",
                                  fix=f"add `PLUGIN_API = {PLUGIN_API}` to the plugin module")
            if api not in SUPPORTED_PLUGIN_APIS:
                raise BridgeError(f"it was written for plugin API {api}; this qlora-bridge {__version__} supports "
                                  f"{', '.join(map(str, SUPPORTED_PLUGIN_APIS))}",
                                  fix="update the plugin for the current API (docs/export.md: writing a plugin)")
            pm.register(module, name=name)
        except Exception as e:  # a broken plugin must not take the others down
            info.error = f"{type(e).__name__}: {e}"
            continue
    for hook, (cls, key_attr) in KINDS.items():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            info = reg.plugins[impl.plugin_name]
            found = []

            def register(item, _cls=cls, _found=found):
                if not isinstance(item, _cls):
                    raise TypeError(f"{hook} must register {_cls.__name__} objects, got {type(item).__name__}")
                _found.append(item)

            try:
                impl.function(register=register)
            except Exception as e:
                info.error = f"{hook} raised {type(e).__name__}: {e}"
                continue
            for item in found:
                key = getattr(item, key_attr)
                table = reg.items[hook]
                if key in table and table[key][1] != info.name:
                    reg.conflicts.setdefault((hook, key), [table[key][1]]).append(info.name)
                else:
                    table[key] = (item, info.name)
                info.provides.append(f"{cls.__name__.lower()} {key}")
    return reg
