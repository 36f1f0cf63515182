"""The public plugin API: everything a plugin, built-in or in-house, may use. It imports no heavy library.

    from qlora_bridge.api import PLUGIN_API, Exporter, ExportRequest, ExportResult, hookimpl

    PLUGIN_API = 3

    @hookimpl
    def register_exporters(register):
        register(Exporter(target="bundle", export=export_bundle, format="safetensors", description="..."))

types.py holds the registrations and what they receive, hookspecs.py the hooks; the helpers below are the core's
own, shared with plugins (tokenized datasets, reference texts, logits, calibration data); `qlora_bridge.api.safetensors`
is the streaming safetensors I/O (it imports torch). `Lineage.from_json(req.lineage)` reads an ExportRequest's lineage
as the typed records the core writes.
"""

from .. import __version__
from ..calibration import calibration
from ..corpus import PARITY_CORPUS, REFERENCE_TEXT, calibration_text, reference_document
from ..data import adds_bos, token_sequences
from ..errors import BridgeError, CheckFailed
from ..files import cache_dir, engine_log
from ..measure.declared import differences, hf_declared
from ..measure.fidelity import fidelity, misses
from ..measure.logits import folder_logits, model_logits, streamed_logits, streamed_model
from ..measure.recipe import MAX_BITS, RecipeSpace, figures_line, search_recipe
from ..modelcard import merged_license
from ..malloc import release_freed_memory
from ..records import Lineage
from .hookspecs import hookimpl
from .planning import CUDA_CONTEXT, ModelShape, Need
from .serving import Client, Golden, SmokeContext, http_json
from .types import (
                    EIGHT_BIT,
                    FLOAT_COPY,
                    FOUR_BIT,
                    Bounds,
                    Declared,
                    Exporter,
                    ExportRequest,
                    ExportResult,
                    LaunchRequest,
                    Server,
                    ServingAdapter,
                    SmokeCheck,
                    TokenScores,
                    check_options,
)

__all__ = ["PLUGIN_API", "hookimpl", "Exporter", "ExportRequest", "ExportResult", "Bounds", "FLOAT_COPY", "EIGHT_BIT",
           "FOUR_BIT", "ServingAdapter", "LaunchRequest", "TokenScores", "SmokeCheck", "SmokeContext", "Golden",
           "Client", "Server", "BridgeError", "CheckFailed", "PARITY_CORPUS", "REFERENCE_TEXT", "calibration",
           "calibration_text", "reference_document", "engine_log", "cache_dir", "http_json", "adds_bos",
           "token_sequences", "folder_logits", "model_logits", "streamed_logits", "streamed_model", "fidelity",
           "misses", "release_freed_memory", "merged_license", "check_options", "ModelShape", "Need", "CUDA_CONTEXT",
           "Lineage", "RecipeSpace", "search_recipe", "figures_line", "MAX_BITS", "Declared", "hf_declared",
           "differences", "__version__"]

# bump when a hook, a registration type or what this module offers changes. 11: the bounds tiers FLOAT_COPY,
# EIGHT_BIT and FOUR_BIT (what the built-ins hold their quant types to); 10: Exporter.declares and Declared
# (what an export folder says about itself, which the gate holds to the merged model's), hf_declared, differences,
# SmokeContext.declares and merged_declared; 9: search_recipe and RecipeSpace
# (recipe=auto's search for any packed target: it describes its recipes, the search measures them), figures_line
# and MAX_BITS; 8: Exporter.summary (the lines the
# terminal shows under an export), engine_log yields the console (for a progress bar among redirected engines),
# streamed_model (a model that reads each module's weights as it runs, for model_logits), fidelity and misses (an
# export's gate figures through an exporter's own logits, no server, and which miss a bound); 7: Need.lighter
# became Need.variants
# (the stage under other settings, lighter or not: the plan uses the one an export's options name), and
# release_freed_memory (for loops that drop a layer and read the next); 6:
# streamed_logits (a forward with one layer in memory), Server.process, Need.mapped and Need.lighter; 5: Lineage
# (the typed reader of ExportRequest.lineage) and CUDA_CONTEXT; 4: Exporter and ServingAdapter gained memory (for
# `plan`), Exporter recognizes; 3: Exporter gained path_options, library and bits_per_weight; 2:
# ServingAdapter.prompt_logprobs became ServingAdapter.logprobs and Exporter gained bounds. Plugins written for 1
# to 9 work unchanged, but for a 6 that declared Need.lighter.
PLUGIN_API = 11
SUPPORTED_PLUGIN_APIS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
