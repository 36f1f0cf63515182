"""The types a plugin registers and receives, each with a worked example (see hookspecs.py for the hooks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import BridgeError
from ..measure.declared import Declared  # the instruments define what they read; the API re-exports it
from ..measure.scores import TokenScores

if TYPE_CHECKING:
    import subprocess

    import torch

    from .planning import ModelShape, Need


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


# The tiers the built-ins hold their quant types to, defined once (an in-house target may use them or declare its
# own). The figures are the demo's (a SmolLM2-135M fine-tune) and llama.cpp's on Llama-3-8B (wikitext): a 135M
# model loses two to three times more than an 8B, so bounds about twice the demo's figures hold a larger model to a
# looser standard than it meets, and never pass what lost the fine-tune. Perplexity is the coarse instrument
# (Q4_K_M moved it 0.3% while its KL on the same text is 10000x F16's): its bound only catches the gross failures.
FLOAT_COPY = Bounds(kl_answers=1e-4, kl_text=2e-4, ppl_ratio=1.001, task_ratio=1.0,
                    reason="a float copy: float32 measured 8e-11 on the demo's text through vLLM, F16 5.7e-6 through "
                           "llama.cpp; 2e-4 is 35x that and 20x below Q8_0")
EIGHT_BIT = Bounds(kl_answers=1e-3, kl_text=0.01, ppl_ratio=1.02, task_ratio=0.98,
                   reason="about 2x the demo's GGUF Q8_0: KL 4.9e-4 along the answers, 4.6e-3 on the text (llama.cpp: "
                          "0.0014 on Llama-3-8B); bfloat16 keeps Q8_0's 8 bits of mantissa")
FOUR_BIT = Bounds(kl_answers=0.01, kl_text=0.12, ppl_ratio=1.05, task_ratio=0.95,
                  reason="about 2x the demo's GGUF Q4_K_M: KL 5.2e-3 along the answers, 0.058 on the text (llama.cpp: "
                         "0.031 on Llama-3-8B)")


@dataclass(frozen=True)
class Exporter:
    """An export target: everything the core knows about it is here.

        Exporter(target="bundle", export=export_bundle, format="safetensors", quant_types=("fp16", "int8"),
                 bounds={"fp16": Bounds(1e-4, 2e-4, 1.001), "int8": Bounds(0.01, 0.05, 1.05, reason="...")},
                 options={"shard_mb": "largest shard in MB (default 2000)"}, path_options=(),
                 library="transformers", bits_per_weight=lambda export: {"fp16": 16, "int8": 8}[export["quant"]])
    """
    target: str  # the name users pass to --target
    export: Callable[[ExportRequest], ExportResult]
    format: str  # the artifact format written, which serving adapters match on: safetensors, gguf, gptq, awq, ...
    quant_types: tuple[str, ...] = ()  # accepted --quant values; the first is the default
    description: str = ""
    # optional: full-vocabulary logits [len, vocab] (float32) of an export folder for each token sequence, one at
    # a time; with it, `compare` can hold this target's artifacts against the trained model
    logits: Callable[[Path, list[list[int]]], Iterator["torch.Tensor"]] | None = None
    # quant type -> the smoke gate's bounds for it; a quant type without bounds is gated by strict defaults
    bounds: dict[str, Bounds] = field(default_factory=dict)
    # the --option keys it reads -> one line on each; any other key is refused before work. None: undeclared
    # (a plugin older than this field), every key is passed through
    options: dict[str, str] | None = None
    path_options: tuple[str, ...] = ()  # options whose value is a file: a project file's are relative to it
    library: str | None = None  # the model card's library_name: what loads the artifact ("transformers", "gguf")
    # the release report's bits per weight of an export, from its manifest's `export` record (quant, settings and
    # the exporter's own checks): e.g. lambda export: {"float32": 32, "float16": 16}.get(export["quant"])
    bits_per_weight: Callable[[dict], float | None] | None = None
    # `qlora-bridge plan`: the export's peak memory and disk for a merged model of this shape (dtype_bytes: the merged
    # dtype), quant type and device (True: a CUDA GPU is given), e.g. lambda shape, quant, gpu: Need(host={...})
    memory: Callable[[ModelShape, str | None, bool], Need] | None = None
    # whether a folder written elsewhere (no manifest) holds this target's format, so `serve` and `smoke` can pick a
    # backend for it: e.g. lambda folder: any(folder.glob("*.bundle.tar"))
    recognizes: Callable[[Path], bool] | None = None
    # the lines the terminal shows under an export's result, from its manifest's `export` record: what was chosen
    # and the figures its own checks measured, against their limits, e.g. lambda export: [f"recipe: {...}"]
    summary: Callable[[dict], list[str]] | None = None
    # what an export folder says about itself (special tokens, chat template, RoPE, shape, lineage), which the
    # smoke gate holds to the merged model's: e.g. api.hf_declared for a Hugging Face folder
    declares: Callable[[Path], Declared] | None = None


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
    """A serving backend: how to start an OpenAI-compatible server on an export, and how to read its scores.

        ServingAdapter(backend="llamacpp", formats=("gguf",), ready_path="/v1/models",
                       command=lambda req: ["python", "-m", "llama_cpp.server", "--model", str(gguf_in(req.artifact)),
                                            "--port", str(req.port)],
                       tokenize=tokenize, logprobs=logprobs, options={"n_ctx": "context length (default 4096)"})
    """
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
    # `qlora-bridge plan`: peak memory serving an artifact of `weight_bytes` for this shape, with a KV cache of
    # `kv_tokens` positions (context x concurrent requests), on a CUDA GPU (True) or the CPU, with the --option
    # values the export's project entry gives the backend (per GPU where it splits the model)
    memory: Callable[[ModelShape, int, int, bool, dict], Need] | None = None


@dataclass(frozen=True)
class SmokeCheck:
    """A check run against every served export; `run` gets the SmokeContext.

        SmokeCheck(name="no-refusals", gate=True,
                   run=lambda ctx: {"passed": "I cannot" not in ctx.client.generate(ctx.suite[0].prompt, 64)[0]})
    """
    name: str
    # gets the SmokeContext (serving.py, which imports this module); returns at least {"passed": bool} and figures
    run: Callable[["SmokeContext"], dict]  # noqa: F821
    gate: bool = True  # a failure fails the smoke test (False: recorded only)
    description: str = ""


@dataclass
class Server:
    """A running server, as the serve stage started it: what a serving adapter's tokenize and logprobs get.

        adapter.logprobs(Server(..., base_url="http://127.0.0.1:8081", artifact=Path("export-gguf-Q4_K_M")), seqs)
    """
    adapter: ServingAdapter
    backend: str
    base_url: str
    pid: int
    log: Path
    artifact: Path
    seconds_to_ready: float
    process: subprocess.Popen | None = None  # for the serve stage to tell a server that died or hung
