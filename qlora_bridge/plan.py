"""`qlora-bridge plan`: will each stage fit? The peak GPU memory, host memory and disk of training, the merge, every
export target and serving, predicted from a model's config.json alone and held against the hardware given.

Each stage's figure is a sum of named terms: what that stage's code holds at its peak (the functions below say
which code). Exports and serving are planned by their plugins (Exporter.memory, ServingAdapter.memory); the
core knows only training and the merge. The constants measured on this project's own runs say where they come
from; `bench/plan.py` runs the stages on the models that run here and prints prediction beside measurement.
No torch here: planning a 70B model must not need one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .api.planning import CUDA_CONTEXT, ModelShape, Need
from .errors import BridgeError
from .project import ExportSpec
from .train_settings import TrainSettings

MiB, GiB = 2**20, 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A process that trains, once torch, transformers, peft and bitsandbytes are imported and the first step ran: 405
# MiB after the imports (torch 2.13 CPU build, Python 3.11), ~150 MiB more of oneDNN and autograd buffers, tokenizer
# and dataset once it works (bench/plan.py, the tiny model, whose weights are negligible). The merge imports the
# same libraries but runs no autograd: 390 MiB, and 60 MiB more once its full check has built two models.
RUNTIME = 560 * MiB
RUNTIME_MERGE = 390 * MiB
RUNTIME_CHECK = 60 * MiB
# Allocators keep more than is live: torch's CUDA caching allocator splits and keeps blocks for reuse, glibc's
# malloc keeps freed blocks of varying sizes in its arenas. 10% over the working set: typical of CUDA training
# loops with varying lengths, and what the demo's 30 CPU steps grew by after their first (3.5 to 4.0 GB).
ALLOCATOR_SLACK = 0.10


def bytes_of_nf4(params: int, double_quant: bool) -> float:
    """bitsandbytes 4-bit storage: 4 bits a weight, one absmax per 64 weights, as float32, or with double
    quantization as one byte plus a float32 per 256 of those (QLoRA paper: 0.127 bits a weight instead of 0.5)."""
    scales = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
    return params * (0.5 + scales)


def read_shape(config: Path) -> ModelShape:
    """A model's shape from its config.json (a multimodal config's text_config); errors name the missing field."""
    config = Path(config)
    if config.is_dir():
        config = config / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except FileNotFoundError:
        raise BridgeError("no config.json here", file=config, fix="pass a Hugging Face model folder (--base) or its "
                          "config.json (--config)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BridgeError(f"not valid JSON ({e})", file=config, fix="pass the model's config.json") from None
    cfg = cfg.get("text_config") or cfg
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for key in (*required, "num_key_value_heads", "head_dim"):
        if key in required and not isinstance(cfg.get(key), int):
            raise BridgeError(f"config lacks {key}", file=config, field=key, fix="plan models decoder-only "
                              "transformers whose config.json names their sizes (Llama, Qwen, Mistral, Gemma, ...)")
        if cfg.get(key) is not None and not (isinstance(cfg[key], int) and cfg[key] > 0):
            raise BridgeError(f"{key} is {cfg[key]!r}: no model has that", file=config, field=key,
                              fix="a positive whole number, as in the model's own config.json")
    heads = cfg["num_attention_heads"]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return ModelShape(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                      layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                      tied=bool(cfg.get("tie_word_embeddings", False)), dtype_bytes=DTYPE_BYTES.get(dtype, 2))


def plan_shape(project, base: str | None = None, config: str | None = None) -> ModelShape:
    """The shape to plan: --config, --base, else the project's base (the embedded model: converted once, cached)."""
    if config or base:
        return read_shape(Path(config or base))
    from .default_model import resolve_base

    return read_shape(resolve_base(project.base if project.base not in (None, "embedded") else None))


# ---------------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    ram: int
    disk: int
    gpus: int = 0
    gpu_memory: int = 0  # per GPU

    def room(self, where: str) -> int:
        return {"gpu": self.gpu_memory, "host": self.ram, "disk": self.disk}[where]

    def describe(self) -> str:
        gpu = f"{self.gpus}x {self.gpu_memory / GiB:.0f} GiB GPU" if self.gpus else "no GPU"
        return f"{gpu}, {self.ram / GiB:.0f} GiB RAM, {self.disk / GiB:.0f} GiB disk"


def parse_size(text: str, flag: str) -> int:
    """'24GB', '24G', '24GiB', '512MB' or a bare number of GB. GPUs and DIMMs sold as '24GB' hold 24 GiB, so GB is
    read as GiB: a plan that says it fits must not depend on the unit's rounding."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    size = int(float(m.group(1)) * {"": GiB, "K": 2**10, "M": MiB, "G": GiB, "T": 2**40}[m.group(2).upper()]) if m \
        else 0
    if size <= 0:
        raise BridgeError(f"not a size: {text!r}", field=flag, fix=f"a size above zero, e.g. {flag} 24GB")
    return size


def hardware(*, gpu: str | None = None, gpus: str | None = None, ram: str | None = None, disk: str | None = None,
             where: Path = Path(".")) -> Hardware:
    """The hardware to plan for; what is not given is this machine's (no GPU, its RAM, the free disk at `where`)."""
    import shutil

    import psutil

    count, size = detected_gpus() if not (gpu or gpus) else (0, 0)
    if gpus:
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(.+)", gpus)
        if not m or int(m.group(1)) < 1:
            raise BridgeError(f"not a GPU count and size: {gpus!r}", field="--gpus", fix="e.g. --gpus 2x80GB")
        count, size = int(m.group(1)), parse_size(m.group(2), "--gpus")
    elif gpu:
        count, size = 1, parse_size(gpu, "--gpu")
    probe = Path(where).resolve()
    while not probe.exists():
        probe = probe.parent
    return Hardware(ram=parse_size(ram, "--ram") if ram else psutil.virtual_memory().total,
                    disk=parse_size(disk, "--disk") if disk else shutil.disk_usage(probe).free,
                    gpus=count, gpu_memory=size)


def detected_gpus() -> tuple[int, int]:
    """This machine's NVIDIA GPUs (count, memory of the smallest) from nvidia-smi, without loading torch."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0, 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return len(out), min(int(x) for x in out) * MiB
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0, 0


# ---------------------------------------------------------------------------------------------------- train
def lora_targets(shape: ModelShape, s: TrainSettings) -> dict[str, tuple[int, int]]:
    linears = shape.linears()
    if s.target_modules == "all-linear":
        return linears
    return {k: v for k, v in linears.items() if k in s.target_modules}


def activation_bytes_per_token(shape: ModelShape, s: TrainSettings) -> tuple[float, float]:
    """What one decoder layer keeps for the backward pass per token, and what a checkpointed layer keeps instead.

    Counted from a Llama layer under peft: the two RMSNorms keep their float32 input, its normalised copy and the
    output (3H each); each LoRA-wrapped linear keeps its dropout's output and mask (a copy of its input: q, k, v,
    gate and up read H, o reads the attention output, down reads the MLP's I); q, k, v before and after rotary
    (2 x (q + 2kv)); attention (SDPA: flash or memory-efficient kernels, no seq x seq matrix) keeps its output; the
    SwiGLU MLP keeps gate, up, silu(gate) and their product (4I). With gradient checkpointing a layer keeps only
    its input (H); the backward recomputes one layer at a time."""
    c = DTYPE_BYTES[s.compute_dtype]
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * 3 * h * 4
    targets = lora_targets(shape, s)
    dropout = sum(n_in for n_in, _ in targets.values()) * (c + 1) if s.dropout > 0 else 0
    # q, k, v before and after rotary; SDPA's output; k and v repeated to every query head (grouped-query attention)
    projections = 2 * (q + 2 * kv) * c + q * c + (2 * q * c if kv < q else 0)
    mlp = 4 * i * c
    layer = norms + dropout + projections + mlp
    return layer, h * c


def train_need(shape: ModelShape, s: TrainSettings, gpu: bool) -> Need:
    """Peak memory of `train`: the frozen 4-bit base, the float32 rest, the LoRA weights with their gradients and
    optimizer state, the activations of one micro-batch at --max-seq-len (every record assumed that long: an upper
    bound), the logits and the loss, and one weight dequantized at a time by bitsandbytes."""
    device = "gpu" if gpu else "host"
    c = DTYPE_BYTES[s.compute_dtype]
    tokens = s.batch_size * s.max_seq_len
    frozen = (bytes_of_nf4(shape.linear_params, s.double_quant) if s.quant != "none"
              else shape.linear_params * 4)  # train loads in float32 and lets bitsandbytes quantize the linears
    lora_params = shape.layers * s.rank * sum(a + b for a, b in lora_targets(shape, s).values())
    optimizer = s.optimizer if s.optimizer != "auto" else ("paged_adamw8bit" if gpu else "adamw")
    state = 8 if optimizer == "adamw" else 2  # two moments, float32 or 8-bit (block scales are <1%)
    per_layer, layer_input = activation_bytes_per_token(shape, s)
    kept = shape.layers * (layer_input if s.gradient_checkpointing else per_layer) * tokens
    # FSDP shards parameters, gradients and optimizer state across the processes; DDP gives each a full copy
    shards = s.processes if s.strategy == "fsdp" and s.processes > 1 else 1
    per = f" (1/{shards} per GPU)" if shards > 1 else ""
    terms = {
        "frozen base, " + (f"{s.quant} 4-bit" if s.quant != "none" else "float32") + per: int(frozen / shards),
        "embeddings, lm_head, norms (float32)" + per: shape.dense_params * 4 // shards,
        f"LoRA r={s.rank}: weights, gradients, {optimizer} state" + per: lora_params * (4 + 4 + state) // shards,
        "activations kept for backward" + (" (checkpointed)" if s.gradient_checkpointing else ""): int(kept),
        # the layer being back-propagated: its activations (recomputed when checkpointed) and their gradients
        "backward of one layer": int(2 * per_layer * tokens),
        # lm_head's output, its float32 copy for the loss, the softmax kept by cross-entropy, and the gradient
        "logits and loss": tokens * shape.vocab * (c + 4 + 4 + 4),
        "one weight dequantized (forward and backward)": 2 * shape.largest_linear * c if s.quant != "none" else 0,
    }
    terms["allocator slack (10%)"] = int(ALLOCATOR_SLACK * sum(terms.values()))
    checkpoint = shape.params * shape.dtype_bytes
    if gpu:
        terms["CUDA context"] = CUDA_CONTEXT
        # transformers reads the checkpoint shard by shard on the host and quantizes on the GPU
        host = {"runtime": RUNTIME, "checkpoint being loaded (one shard)": min(5 * GiB, checkpoint)}
        if s.processes > 1:  # one process per GPU, each with its own runtime on the host
            host["runtime"] *= s.processes
    else:
        terms["runtime"] = RUNTIME
        # transformers maps the checkpoint to load it; on a CPU its pages stay resident through training (measured:
        # the demo's 540 MB file was 508-623 MB of the process's file-backed memory until it ended)
        terms["checkpoint file, mapped"] = checkpoint
        host = {}
        if s.processes > 1:  # data-parallel CPU processes each hold all of it
            terms[f"{s.processes - 1} more processes"] = sum(terms.values()) * (s.processes - 1)
    notes = [f"micro-batch {s.batch_size} x {s.max_seq_len} tokens"
             + (", gradient checkpointing" if s.gradient_checkpointing else "")
             + (f", {s.processes} processes ({s.strategy})" if s.processes > 1 else "")]
    if optimizer == "paged_adamw8bit" and gpu:
        notes.append("paged optimizer: its state can spill to host memory under pressure")
    return Need(**{device: terms}, **({"host": host} if gpu else {}), notes=tuple(notes))


def train_fixes(shape: ModelShape, s: TrainSettings, hw: Hardware) -> list[str]:
    """The first settings, cheapest in quality and speed first, under which training fits."""
    gpu = hw.gpus > 0
    tries = [
        ("--gradient-checkpointing", {"gradient_checkpointing": True}),
        ("--optimizer paged_adamw8bit", {"optimizer": "paged_adamw8bit"}),
        *([(f"--processes {hw.gpus} --strategy fsdp (the base sharded across the GPUs)",
            {"processes": hw.gpus, "strategy": "fsdp"})] if hw.gpus > 1 else []),
        ("--batch-size 1 with --grad-accum {ga} (same global batch)",
         {"batch_size": 1, "grad_accum": s.batch_size * s.grad_accum}),
        ("--max-seq-len {half}", {"max_seq_len": max(64, s.max_seq_len // 2)}),
        ("--rank {r}", {"rank": max(4, s.rank // 2)}),
    ]
    if s.optimizer == "auto":  # what auto picks here: no point suggesting it
        s = replace(s, optimizer="paged_adamw8bit" if gpu else "adamw")
    changes, current = [], s
    for text, change in tries:
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        current = replace(current, **change)
        changes.append(text.format(ga=s.batch_size * s.grad_accum, half=max(64, s.max_seq_len // 2),
                                   r=max(4, s.rank // 2)))
        if fits(train_need(shape, current, gpu), hw):
            return changes
    return changes + ["a larger GPU, or several with FSDP" if gpu else "more RAM, or a GPU"]


# ---------------------------------------------------------------------------------------------------- merge
def merge_need(shape: ModelShape, dtype: str, check: str, hw: Hardware) -> tuple[Need, str]:
    """Peak memory of `merge` and the check `auto` picks. The merge streams: one tensor at a time is read (the
    checkpoint's dtype), copied to float32, rebuilt through NF4 (packed codes, then float32 again), merged and
    cast to the stored dtype. The full check then loads the 4-bit base + adapter and the merged model in float32;
    `auto` does so only when 3x the float32 model fits in free memory (stages/merge.py), else it samples each layer."""
    out = DTYPE_BYTES[dtype]
    biggest_linear = shape.largest_linear
    embedding = shape.vocab * shape.hidden
    # a tensor without LoRA is only cast, and a cast to its own dtype copies nothing; a float16 merge of a base of
    # the same width is counted as a copy, since most bases are bfloat16 (8B shape: 2.5 GiB measured, bench/scale.py)
    copy = out if out != shape.dtype_bytes or dtype == "float16" else 0
    stream = max(biggest_linear * (shape.dtype_bytes + 4 + 0.5 + 4 + out), embedding * (shape.dtype_bytes + copy))
    fp32 = shape.params * 4
    method = check if check != "auto" else ("full" if 3 * fp32 < hw.ram else "layer")
    host = {"runtime": RUNTIME_MERGE, "one tensor in flight": int(stream)}
    if method == "full":
        host["check: libraries of the two models"] = RUNTIME_CHECK
        host["check: merged model in float32"] = fp32
        host["check: 4-bit base + adapter"] = int(bytes_of_nf4(shape.linear_params, True) + shape.dense_params * 4)
        # float32 logits of the reference text (up to 512 tokens) from the merged, trained and base models, and a
        # difference of two of them
        host["check: logits"] = 4 * 512 * shape.vocab * 4
    gpu = {}
    if hw.gpus:  # adapters trained on a GPU: NF4 is rebuilt there, and the full check loads the 4-bit model there
        gpu = {"CUDA context": CUDA_CONTEXT, "NF4 rebuilt on the GPU": int(biggest_linear * (4 + 0.5 + 4))}
        if method == "full":
            gpu["check: 4-bit base + adapter"] = host.pop("check: 4-bit base + adapter")
            gpu["check: logits of the 4-bit model"] = 2 * 512 * shape.vocab * 4
    disk = {f"merged model ({dtype})": shape.params * out}
    return Need(gpu=gpu, host=host, disk=disk, notes=(f"check: {method}",)), method


# ---------------------------------------------------------------------------------------------------- the plan
def short_of(need: Need, hw: Hardware) -> list[str]:
    """Where the need exceeds the hardware: some of gpu, host, disk."""
    return [w for w in ("gpu", "host", "disk") if getattr(need, w) and need.total(w) > hw.room(w)]


def fits(need: Need, hw: Hardware) -> bool:
    return not short_of(need, hw)


@dataclass
class StagePlan:
    name: str
    need: Need
    fits: bool
    short: list[str] = field(default_factory=list)  # where it does not fit
    fixes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        n = self.need
        return {"fits": self.fits, "short": self.short, "fixes": self.fixes, "notes": list(n.notes),
                **{w: {"total": n.total(w), "terms": getattr(n, w)} for w in ("gpu", "host", "disk", "mapped")}}


def stage(name: str, need: Need, hw: Hardware, fixes=lambda: []) -> StagePlan:
    short = short_of(need, hw)
    return StagePlan(name, need, not short, short, fixes() if short else [])


def plan(shape: ModelShape, s: TrainSettings, hw: Hardware, registry, exports: list[ExportSpec], *,
         merge_dtype: str = "float32", merge_check: str = "auto", context: int = 4096, concurrency: int = 1) -> dict:
    """Every stage of a release of this shape: train, merge, each export (its target's default quant when it names
    none) and serving it on its backend (the first that serves the format when it names none)."""
    gpu = hw.gpus > 0
    stages = [stage("train", train_need(shape, s, gpu), hw, lambda: train_fixes(shape, s, hw))]
    merge, method = merge_need(shape, merge_dtype, merge_check, hw)
    stages.append(stage("merge", merge, hw, lambda: ["--check layer"] if method == "full" else
                        ["--dtype bfloat16 (half the disk; the merge report says how much of the delta it keeps)"]))
    merged = replace(shape, dtype_bytes=DTYPE_BYTES[merge_dtype])
    unplanned = []
    for spec in exports:
        resolved = registry.resolve_export(spec.target, spec=spec)  # a project table's errors name its line
        exporter, quant = resolved.exporter, resolved.quant
        name = f"{spec.target}-{quant}" if quant else spec.target
        if exporter.memory is None:
            unplanned.append(f"export {name}: the exporter does not declare its memory (Exporter.memory)")
            continue
        need = export_need(exporter, merged, quant, gpu, spec.options)
        stages.append(stage(f"export {name}", need, hw, lambda e=exporter, q=quant, n=need:
                            fitting_variant(n, hw) or smaller_quants(e, q, merged, hw)))
        try:
            backend = spec.backend or registry.backend_for(exporter.format)
        except BridgeError:  # release reports such an export as not verified; nothing to plan here
            unplanned.append(f"serve {name}: no installed backend serves {exporter.format}")
            continue
        adapter, _ = registry.server(backend)
        if adapter.memory is None:
            unplanned.append(f"serve {name} on {backend}: the backend does not declare its memory")
            continue
        weights = need.output or merged.params * merged.dtype_bytes
        serve = adapter.memory(merged, weights, context * concurrency, gpu, dict(spec.options))
        stages.append(stage(f"serve {name}", serve, hw, lambda: [f"a shorter context or fewer concurrent requests "
                                                                 f"than {context} x {concurrency}"]))
    return {"hardware": hw.describe(), "model": {"params": shape.params, "layers": shape.layers,
                                                 "hidden": shape.hidden, "vocab": shape.vocab},
            "fits": all(p.fits for p in stages), "stages": {p.name: p.to_dict() for p in stages},
            "unplanned": unplanned}


def release_plan(project, registry) -> dict:
    """The project's release on this machine, planned before any stage runs (smoke serves at 2048 tokens)."""
    settings = TrainSettings(**project.train)
    settings.validate()
    return plan(plan_shape(project), settings, hardware(where=project.out), registry, project.exports,
                merge_dtype=project.merge.get("dtype", "float32"), context=2048)


def shortfall(report: dict) -> tuple[str, str]:
    """What does not fit, and what to try: for an error message."""
    bad = {n: p for n, p in report["stages"].items() if not p["fits"]}
    what = "; ".join(f"{n} needs " + ", ".join(f"{p[w]['total'] / GiB:.1f} GiB {w}" for w in p["short"])
                     for n, p in bad.items())
    return f"{what} ({report['hardware']})", "; ".join(f"{n}: {', '.join(p['fixes'])}" for n, p in bad.items())


def export_need(exporter, shape: ModelShape, quant: str | None, gpu: bool, options: dict) -> Need:
    """What an export needs under its options: the variant they name (Need.variants), else the target's default."""
    need = exporter.memory(shape, quant, gpu)
    given = {f"--option {k}={v}" for k, v in options.items()}
    return next((other for setting, other in need.variants if setting in given), need)


def fitting_variant(need: Need, hw: Hardware) -> list[str]:
    """The first setting the stage declares (Need.variants) under which it fits, with what it then needs."""
    for setting, other in need.variants:
        if fits(other, hw):
            where = ", ".join(f"{w} {other.total(w) / GiB:.1f} GiB" for w in ("gpu", "host") if getattr(other, w))
            return [f"{setting} ({where})"]
    return []


def smaller_quants(exporter, quant: str | None, shape: ModelShape, hw: Hardware) -> list[str]:
    others = [q for q in exporter.quant_types if q != quant and fits(exporter.memory(shape, q, hw.gpus > 0), hw)]
    return [f"--quant {q}" for q in others[:3]] or ["more RAM or disk"]


def render(report: dict) -> str:
    lines = [f"plan for a {report['model']['params'] / 1e9:.2f}B-parameter model on {report['hardware']}"]
    for name, p in report["stages"].items():
        where = "  ".join(f"{w} {p[w]['total'] / GiB:.1f} GiB" for w in ("gpu", "host", "disk") if p[w]["terms"])
        if p["mapped"]["terms"]:
            where += f"  (+{p['mapped']['total'] / GiB:.1f} GiB mapped, reclaimable)"
        lines.append(f"  {'fits' if p['fits'] else 'DOES NOT FIT':<13}{name:<30}{where}")
        if not p["fits"]:
            lines.append(f"{'':15}short of {', '.join(p['short'])}; try: {'; '.join(p['fixes'])}")
    lines += [f"  not planned: {u}" for u in report["unplanned"]]
    return "\n".join(lines)
