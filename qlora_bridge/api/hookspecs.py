"""The plugin hooks: a plugin module sets PLUGIN_API and implements any of them with @hookimpl.

Each hook receives a `register` function; call it once per thing the plugin offers, with one of the typed
registrations of `qlora_bridge.api` (types.py).
"""

import pluggy

hookspec = pluggy.HookspecMarker("qlora_bridge")
hookimpl = pluggy.HookimplMarker("qlora_bridge")


@hookspec
def register_exporters(register):
    """Register export targets.

        @hookimpl
        def register_exporters(register):
            register(Exporter(target="bundle", export=export_bundle, format="safetensors", quant_types=("fp16",),
                              bounds={"fp16": Bounds(1e-4, 2e-4, 1.001)}, options={}, library="transformers"))
    """


@hookspec
def register_servers(register):
    """Register serving backends.

        @hookimpl
        def register_servers(register):
            register(ServingAdapter(backend="tgi", formats=("safetensors",), command=tgi_argv, logprobs=tgi_scores))
    """


@hookspec
def register_smoke_checks(register):
    """Register checks run against every served export.

        @hookimpl
        def register_smoke_checks(register):
            register(SmokeCheck(name="answers-in-json", run=lambda ctx: {"passed": all_json(ctx)}, gate=False))
    """
