"""The public plugin API: everything a plugin, built-in or in-house, may use.

    from qlora_bridge.api import PLUGIN_API, Exporter, ExportRequest, ExportResult, hookimpl

    PLUGIN_API = 1

    @hookimpl
    def register_exporters(register):
        register(Exporter(target="bundle", export=export_bundle, description="..."))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pluggy

from .errors import BridgeError, CheckFailed

__all__ = ["PLUGIN_API", "hookimpl", "Exporter", "ExportRequest", "ExportResult", "ServingAdapter",
           "LaunchRequest", "SmokeCheck", "BridgeError", "CheckFailed"]

PLUGIN_API = 1  # bump when a hook or a registration type changes incompatibly
SUPPORTED_PLUGIN_APIS = (1,)

hookimpl = pluggy.HookimplMarker("qlora_bridge")


@dataclass
class ExportRequest:
    merged: Path  # the merged Hugging Face model folder (with merge_report.json)
    out: Path  # write every output file here; the core records, digests and signs them afterwards
    quant: str | None  # one of the exporter's quant_types, or None for its default
    options: dict[str, str] = field(default_factory=dict)  # --option KEY=VALUE pairs, for the exporter to parse
    lineage: dict = field(default_factory=dict)  # base, adapter and merge facts, e.g. to embed as metadata
    progress: bool = True


@dataclass
class ExportResult:
    settings: dict = field(default_factory=dict)  # every setting the export used, resolved (goes to the manifest)
    checks: dict = field(default_factory=dict)  # what the exporter verified itself (read-back, bits per weight, ...)


@dataclass(frozen=True)
class Exporter:
    target: str  # the name users pass to --target
    export: Callable[[ExportRequest], ExportResult]
    format: str  # the artifact format written, which serving adapters match on: safetensors, gguf, gptq, awq, ...
    quant_types: tuple[str, ...] = ()  # accepted --quant values; the first is the default
    description: str = ""


@dataclass
class LaunchRequest:
    artifact: Path  # the export folder to serve
    port: int  # on 127.0.0.1
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServingAdapter:
    backend: str  # the name users pass to --backend
    formats: tuple[str, ...]  # artifact formats it can serve
    command: Callable[[LaunchRequest], list[str]]  # argv that starts an OpenAI-compatible server
    ready_path: str = "/health"  # GET answers 200 once the server can take requests
    description: str = ""


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    run: Callable  # run(context) -> dict with at least {"passed": bool}; the context comes with the smoke stage
    gate: bool = True  # a failure fails the smoke test (False: recorded only)
    description: str = ""
