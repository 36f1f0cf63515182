"""The public plugin API: everything a plugin, built-in or in-house, may use.

    from qlora_bridge.api import PLUGIN_API, Exporter, ExportRequest, ExportResult, hookimpl

    PLUGIN_API = 2

    @hookimpl
    def register_exporters(register):
        register(Exporter(target="bundle", export=export_bundle, description="..."))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pluggy

from .calibration import calibration
from .corpus import PARITY_CORPUS, REFERENCE_TEXT, calibration_text, reference_document
from .data import adds_bos, token_sequences
from .errors import BridgeError, CheckFailed
from .files import cache_dir, engine_log
from .logits import folder_logits, model_logits
from .modelcard import merged_license

if TYPE_CHECKING:
    import torch

    # at run time these come through __getattr__ below: they need the plugin registry themselves
    from .serve import Server
    from .smoke import Golden, SmokeContext

__all__ = ["PLUGIN_API", "hookimpl", "Exporter", "ExportRequest", "ExportResult", "Bounds", "ServingAdapter",
           "LaunchRequest", "TokenScores", "SmokeCheck", "SmokeContext", "Golden", "Server", "BridgeError",
           "CheckFailed", "PARITY_CORPUS", "REFERENCE_TEXT", "calibration", "calibration_text", "reference_document",
           "engine_log", "cache_dir", "http_json", "adds_bos", "token_sequences", "folder_logits", "model_logits",
           "merged_license"]

# bump when a hook or a registration type changes incompatibly. 2: ServingAdapter.prompt_logprobs (log-probabilities
# of a text's tokens) became ServingAdapter.logprobs (next-token distributions along token sequences) and Exporter
# gained bounds; an API-1 exporter or smoke check works unchanged.
PLUGIN_API = 2
SUPPORTED_PLUGIN_APIS = (1, 2)

hookimpl = pluggy.HookimplMarker("qlora_bridge")


def http_json(url: str, body: dict, timeout: float = 300.0) -> dict:
    """POST a JSON body, return the JSON answer; an HTTP error raises with the server's message."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} answered {e.code}: {e.read()[:500]!r}") from None


@dataclass
class ExportRequest:
    merged: Path  # the merged Hugging Face model folder (with merge_report.json)
    out: Path  # write every output file here; the core records, digests and signs them afterwards
    quant: str | None  # one of the exporter's quant_types, or None for its default
    options: dict[str, str] = field(default_factory=dict)  # --option KEY=VALUE pairs, for the exporter to parse
    lineage: dict = field(default_factory=dict)  # base, adapter and merge facts, e.g. to embed as metadata
    progress: bool = True
    # beside the export folder (OUT.export.log): where an engine's own console output goes, through engine_log
    log: Path | None = None


@dataclass
class ExportResult:
    settings: dict = field(default_factory=dict)  # every setting the export used, resolved (goes to the manifest)
    checks: dict = field(default_factory=dict)  # what the exporter verified itself (read-back, bits per weight, ...)


@dataclass(frozen=True)
class Bounds:
    """The smoke gate's limits for one quant type, declared by the exporter that writes it. An export passes when
    its served next-token distributions stay this close to the reference model's (the model that was trained)
    and its held-out task score does not drop significantly below task_ratio of the reference's.

        Bounds(kl_answers=0.02, kl_text=0.1, ppl_ratio=1.1,
               reason="measured on the demo: 0.007 and 0.05 (x2 for other models); llama.cpp on Llama-3-8B "
                      "gives a mean KLD of 0.031 for Q4_K_M")
    """
    kl_answers: float  # max mean KL divergence (nats/token) along the reference's own held-out answers
    kl_text: float  # max mean KL divergence (nats/token) on the reference text
    ppl_ratio: float  # max perplexity on the reference text, export / reference
    task_ratio: float = 0.95  # min held-out task score, export / reference; fails only on a significant drop
    reason: str = ""  # the measurement or published figure the numbers come from


@dataclass(frozen=True)
class Exporter:
    target: str  # the name users pass to --target
    export: Callable[[ExportRequest], ExportResult]
    format: str  # the artifact format written, which serving adapters match on: safetensors, gguf, gptq, awq, ...
    quant_types: tuple[str, ...] = ()  # accepted --quant values; the first is the default
    description: str = ""
    # optional: full-vocabulary logits [len, vocab] (float32) of an export folder for each token sequence, one at
    # a time; with it, `merge --compare` can hold this target's artifacts against the trained model
    logits: Callable[[Path, list[list[int]]], Iterator["torch.Tensor"]] | None = None
    # quant type -> the smoke gate's bounds for it; a quant type without bounds is gated by strict defaults
    bounds: dict[str, Bounds] = field(default_factory=dict)
    # the --option keys it reads -> one line on each; any other key is refused before work. None: undeclared
    # (a plugin older than this field), every key is passed through
    options: dict[str, str] | None = None


def check_options(given: dict, declared: dict[str, str] | None, what: str) -> None:
    """Refuse a --option key that `what` (an exporter or a serving backend) does not declare: ignored, it would
    leave the user believing it took effect (a port that is not the one served, a setting recorded but not used)."""
    unknown = sorted(set(given) - set(declared)) if declared is not None else []
    if unknown:
        raise BridgeError(f"{what} takes no option {unknown[0]!r}", field=f"--option {unknown[0]}",
                          fix=f"it takes: {', '.join(sorted(declared)) or 'none'} (`qlora-bridge plugins --json` "
                          "describes each)")


@dataclass
class LaunchRequest:
    artifact: Path  # the export folder to serve
    port: int  # on 127.0.0.1
    options: dict[str, str] = field(default_factory=dict)
    format: str = ""  # the artifact's format, one of the adapter's formats


@dataclass(frozen=True)
class ServingAdapter:
    backend: str  # the name users pass to --backend
    formats: tuple[str, ...]  # artifact formats it can serve
    command: Callable[[LaunchRequest], list[str]]  # argv that starts an OpenAI-compatible server
    ready_path: str = "/health"  # GET answers 200 once the server can take requests
    # the two calls that differ between servers, given the running server (.base_url, .artifact): a text's token
    # ids (special tokens parsed), and the served model's next-token distributions along token sequences
    tokenize: Callable[["Server", str], list[int]] | None = None
    logprobs: Callable[["Server", list[list[int]]], Iterator["TokenScores"]] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)  # format -> why this backend refuses it
    description: str = ""
    options: dict[str, str] | None = None  # as Exporter.options: the --option keys it reads


@dataclass
class TokenScores:
    """A model's next-token log-probabilities along one token sequence, as its engine computed them: row j is the
    distribution of token j + 1 given tokens 0..j, so a sequence of n tokens has n - 1 rows.

        TokenScores(torch.log_softmax(logits[:-1], -1))  # the full vocabulary, from [n, vocab] logits
        TokenScores(logprobs=top_k_logprobs, ids=top_k_ids)  # [n - 1, k], padded with id -1 and -inf
    """
    logprobs: "torch.Tensor"  # [n - 1, k] float32 log-probabilities
    ids: "torch.Tensor | None" = None  # [n - 1, k] their token ids (each row must hold the actual next token);
    # None: the columns are the whole vocabulary in order


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    run: Callable[["SmokeContext"], dict]  # returns at least {"passed": bool} plus the figures to record
    gate: bool = True  # a failure fails the smoke test (False: recorded only)
    description: str = ""


def __getattr__(name: str):
    # SmokeContext and Golden live with the smoke stage, which needs the plugin registry itself
    if name in ("SmokeContext", "Golden"):
        from . import smoke

        return getattr(smoke, name)
    if name == "Server":
        from . import serve

        return serve.Server
    raise AttributeError(name)
