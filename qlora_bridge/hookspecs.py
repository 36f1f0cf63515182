"""The plugin hooks. A plugin module sets PLUGIN_API and implements any of these with @hookimpl.

Each hook receives a `register` function; call it once per thing the plugin offers, with one of the small
typed objects from `qlora_bridge.api` (Exporter, ServingAdapter, SmokeCheck).
"""

import pluggy

hookspec = pluggy.HookspecMarker("qlora_bridge")


@hookspec
def register_exporters(register):
    """Register export targets: register(Exporter(target=..., export=..., quant_types=..., bounds={quant: Bounds(...)},
    options={"threads": "CPU threads (default: every core)"}))."""


@hookspec
def register_servers(register):
    """Register serving backends: register(ServingAdapter(backend=..., formats=..., command=..., logprobs=...,
    options={...}))."""


@hookspec
def register_smoke_checks(register):
    """Register smoke checks run against a served export: register(SmokeCheck(name=..., run=...))."""
