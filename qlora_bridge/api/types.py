"""The types a plugin registers and receives, each with a worked example (see hookspecs.py for the hooks)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import BridgeError
from ..measure.declared import Declared  # the instruments define what they read; the API re-exports it
from ..measure.scores import TokenScores

if TYPE_CHECKING:
    import subprocess

    import torch


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
class ModelShape:
    """A decoder-only transformer as `qlora-bridge plan` sees it: read from config.json, no weights needed.

    Llama-2-7B's config gives ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
    head_dim=128, vocab=32000, dtype_bytes=2): .params 6.74e9, .kv_bytes(4096) 2.1 GB (float16 cache).
    """
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix
    dtype_bytes: int = 2  # bytes per weight of the checkpoint a stage reads: 2 for a bf16 base, 4 for a float32 merge

    def linears(self) -> dict[str, tuple[int, int]]:
        """One layer's linear modules, name -> (in, out): what QLoRA quantizes and LoRA targets."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def largest_linear(self) -> int:
        """Weights of one layer's largest linear module: what a stage dequantizes or merges at a time."""
        return max(a * b for a, b in self.linears().values())

    @property
    def largest_matrix(self) -> int:
        """Weights of the largest tensor, the embedding included: what a streaming stage holds at a time."""
        return max(self.vocab * self.hidden, self.largest_linear)

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def dense_params(self) -> int:
        """Everything that is not a quantized linear: embeddings, lm_head, norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.dense_params

    def kv_bytes(self, tokens: int, bytes_per: int = 2) -> int:
        """KV cache for `tokens` positions: a key and a value per layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * bytes_per


# What a process that uses the GPU holds there outside torch's allocator (the CUDA context, cuBLAS workspace, loaded
# kernels), for a Need's GPU terms: 500-700 MB with torch 2.x on A100/H100; 749 MiB measured on an H200 with torch
# 2.11 (nvidia-smi minus torch.cuda.max_memory_reserved, bench/gpu_e2e.py's train stage).
CUDA_CONTEXT = 700 << 20


@dataclass(frozen=True)
class Need:
    """One stage's peak GPU memory, host memory and disk, in bytes, each as named terms so a report can say why.

        Need(host={"runtime": 600 << 20, "largest tensor, float32": 4 * 32000 * 4096},
             disk={"output": 4 * 6_738_415_616}, notes=("streams tensor by tensor",))
    """
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)  # anonymous memory: what must fit in RAM
    disk: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    output: int = 0  # bytes of what the stage hands on: an export's artifact, which serving loads
    # clean file-backed pages of an input a tool maps and reads once (llama.cpp's quantizer over its F16 file):
    # resident while there is room, dropped by the kernel under pressure and read again, so reported beside
    # host memory, not counted in it
    mapped: dict[str, int] = field(default_factory=dict)
    # the same stage under other settings, as (the setting, its Need): the plan uses the one an export's options
    # name, and where the stage does not fit names the first that does, e.g. (("--option engine=x", Need(...)),)
    variants: tuple = ()

    def total(self, where: str) -> int:
        return sum(getattr(self, where).values())


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
    run: Callable[["SmokeContext"], dict]  # returns at least {"passed": bool} plus the figures to record
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


@dataclass
class Golden:
    """One golden prompt and how to judge the served answer.

        Golden([{"role": "user", "content": "2+2="}], "4", match="contains").passes("It is 4.")  # True
    """
    prompt: list[dict] | str
    expected: str
    match: str = "exact"
    merged_answer: str | None = None  # what the merged model answered, when the suite comes from lineage

    def passes(self, got: str) -> bool:
        got, expected = got.strip(), self.expected.strip()
        if self.match == "exact":
            return got == expected
        if self.match == "contains":
            return expected in got
        if self.match == "regex":
            return re.search(expected, got) is not None
        try:
            return json.loads(got) == json.loads(expected)
        except json.JSONDecodeError:
            return False


class Client:
    """The few OpenAI-compatible calls the checks make, on the standard library."""

    def __init__(self, base_url: str, timeout: float = 300.0):
        self.base_url, self.timeout = base_url, timeout

    def post(self, path: str, body: dict) -> dict:
        return http_json(self.base_url + path, body, self.timeout)

    def generate(self, prompt: list[dict] | str, max_tokens: int) -> tuple[str, dict]:
        """Greedy answer to a chat (list of messages) or a plain completion prompt, with the usage counts."""
        body = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
        if isinstance(prompt, list):
            out = self.post("/v1/chat/completions", {"messages": prompt, **body})
            return out["choices"][0]["message"]["content"] or "", out.get("usage", {})
        out = self.post("/v1/completions", {"prompt": prompt, **body})
        return out["choices"][0]["text"], out.get("usage", {})


@dataclass
class SmokeContext:
    """What a smoke check gets: the running server, the export, the reference model, the suite and the bounds.

    measurements() gives the divergence and task-score figures, computed once and shared by every check."""

    client: Client
    server: Server
    artifact: Path
    manifest: dict
    merged: Path | None
    suite: list[Golden]  # golden prompts
    min_pass_rate: float
    heldout: list[Golden]  # held-out prompts with the reference's answers
    reference: object  # the model that was trained: its held-out answers and cached scores (measure/reference.py)
    bounds: Bounds
    bounds_source: str
    # how to read what the export says about itself (its exporter's `declares`; None: it has none), and what the
    # merged model says, with the adapter the export's lineage names (only that, where no merged folder is at hand)
    declares: Callable[[Path], Declared] | None
    merged_declared: Declared
    # the smoke stage's measurement: (reference, tokenizer, the served model's scores for token sequences) -> figures
    measure: Callable[[object, object, Callable[[list[list[int]]], Iterator[TokenScores]]], dict]
    _cache: dict = field(default_factory=dict)

    def tokenizer(self):
        if "tok" not in self._cache:
            from transformers import AutoTokenizer

            source = self.merged if self.merged else self.artifact
            self._cache["tok"] = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        return self._cache["tok"]

    def measurements(self) -> dict:
        """Through the serving engine (ServingAdapter.logprobs); computed once, shared by every check."""
        if "measured" not in self._cache:
            adapter = self.server.adapter
            if adapter.logprobs is None:
                raise BridgeError(f"backend {self.server.backend} offers no next-token log-probabilities",
                                  field="--backend", fix="serve it with a backend whose adapter has `logprobs`")
            self._cache["measured"] = self.measure(self.reference, self.tokenizer(),
                                                   lambda sequences: adapter.logprobs(self.server, sequences))
        return self._cache["measured"]


