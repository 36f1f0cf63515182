"""Built-in exporters `gptq` and `awq`: 4-bit (GPTQ also 8-bit) checkpoints for vLLM.

Each target has one on-disk format, GPTQ checkpoint format v1 (symmetric) and AWQ GEMM (zero points), whichever
engine writes it (engines.py): by default our own GPTQ, one decoder layer in memory at a time (streamed.py), or
GPTQModel 7.6 or AutoRound 0.16, which load the whole model (and offer AWQ's scale search); the manifest names the
engine, its version and every setting. Calibration defaults to the fine-tune's own training data, tokenized as it
was trained. Every export is read back with our own format reader (formats.py) and compared with the
merged weights layer by layer, then as a whole model; an export off the scale fails and nothing is kept.
By default the group size and the modules kept in 16 bits are chosen by measuring the fine-tune (recipe.py:
the fewest bits whose figures stay inside the gate's bounds by a margin); group_size or keep pin a fixed recipe.

Options (--option KEY=VALUE): OPTIONS below; defaults per target in DEFAULTS and SETTINGS.
"""

import json
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from qlora_bridge.api import (CUDA_CONTEXT, EIGHT_BIT, FOUR_BIT, MAX_BITS, REFERENCE_TEXT, BridgeError, CheckFailed,
                              Exporter, ExportRequest, ExportResult, ModelShape, Need, calibration, engine_log,
                              figures_line, hf_declared, hookimpl, model_logits, search_recipe, streamed_model)

from .engines import ENGINES, Job, version

PLUGIN_API = 11  # the plugin API this module was written for
# a 4-bit export is held to what llama.cpp's Q4_K_M achieves on the same model, with a factor of two (the issue that
# set the 4-bit targets: "KL no more than twice the GGUF Q4_K_M's"), an 8-bit one to Q8_0's
BOUNDS = {"int4": FOUR_BIT, "int8": EIGHT_BIT}
GROUPS = (128, 64, 32)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
LAYER_KINDS = (".self_attn.", ".mlp.")  # the quantizers pack the decoder layers' Linears, not embeddings or head
# Chosen by bench/quant_quality.py on the demo (docs/gptq-awq.md), reference task score 0.54:
# - groups of 32 (GPTQ: KL along the answers 0.0114 against 0.0175 at 64, task 0.515 against 0.43);
# - GPTQ by GPTQModel on 8 blocks of 512 tokens of the training data, or enough for twice the widest layer input
#   (GPTQ_TOKENS_PER_INPUT) if that is more: 8 blocks kept what 32 did (KL along the answers 0.0137 against 0.0114,
#   task 0.53 against 0.515) in a quarter of the time (98 s for the whole export on 2 cores);
# - AWQ by GPTQModel's GPTQ, asymmetric, repacked into the AWQ GEMM layout, on 8 blocks of the training data and
#   2048 tokens of general text, without true_sequential: KL along the answers 0.0082, on the text 0.084, task 0.51
#   (no significant drop), perplexity ratio 1.075, 134 s for the whole export. AWQ's own scale search (AutoRound,
#   groups of 32) lost a third of the skill (task 0.355, KL along the answers 0.0199) in 620 s; GPTQModel's AWQ,
#   with its fixed clip search, takes 34 minutes. The asymmetric grid is what the AWQ format adds: symmetric GPTQ
#   with the same general text loses more (KL on the text 0.152, task 0.47). The general text halves the KL on the
#   text (0.150 -> 0.085 at 8 blocks) for nothing along the answers; true_sequential (one forward per module
#   subset, five a layer) takes 1.5x the time and measured no better (8 blocks + 4096 tokens: 0.0093 against
#   0.0104 along the answers, task 0.505 against 0.495, within the figures' noise);
# - the awq target's fixed recipe keeps q/k/v in float16 (6.40 bits per decoder weight on the demo, against 4.63 all
#   packed and the 6.16 of the GGUF Q4_K_M the bounds come from). All packed, it failed the gate on vLLM (KL along the
#   answers 0.0106 > 0.01, perplexity ratio 1.068 > 1.05); with q/k/v kept it passed with margin (KL 0.0058 and 0.045,
#   perplexity ratio 1.037, task 0.54 as the merged model's). Where the loss sits, by module kind: bench/
#   quant_sensitivity.py; q/k/v went first because vLLM runs the three as one Linear (FUSED) and, at 16% of the
#   decoder's weights, they bought the most per bit. The gptq target keeps nothing: symmetric 4-bit (the only kind
#   vLLM's GPTQ kernels take) stayed over the perplexity bound even with q/k/v and down_proj kept (docs/gptq-awq.md);
# - since issue 32 both written by the streamed engine, the same GPTQ with the same settings one decoder layer at a
#   time: on the demo gptq KL along the answers 0.0108 against GPTQModel's 0.0143, awq 0.0059-0.0070 over three
#   equivalent runs against GPTQModel's 0.0058, in two thirds of the time and memory;
# - since issue 33 the group size and the kept modules are the recipe=auto search's (recipe.py) where it can run;
#   group 32 and the keep below are the fixed recipe's, for recipe=fixed, the other engines and a lineage without
#   held-out answers.
DEFAULTS = {"gptq": {"engine": "streamed"}, "awq": {"engine": "streamed", "algorithm": "gptq"}}
AWQ_ENGINE = "gptqmodel"  # for algorithm=awq when no engine is named (streamed rounds with GPTQ only)
GPTQ_ENGINES = ("gptqmodel", "streamed")  # those whose GPTQ takes damp, true_sequential and keep
SETTINGS = {  # by (target, algorithm)
    ("gptq", "gptq"): {"samples": 8, "text_tokens": 0, "true_sequential": 1, "keep": ""},
    ("awq", "gptq"): {"samples": 8, "text_tokens": 2048, "true_sequential": 0, "keep": "q_proj,k_proj,v_proj"},
    ("awq", "awq"): {"samples": 4, "text_tokens": 0, "true_sequential": 1}}
# vLLM fuses q/k/v into one Linear and gate/up into another (the packed_modules_mapping of Llama-family models),
# and one Linear has one quantization scheme: it refuses a checkpoint that packs some of a fused set and not the rest.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
AWQ_GRID = 10
DEFAULT_GROUP = 32
# GPTQ's Hessian of a layer with n inputs has rank at most the number of calibration tokens: below n it is singular
# and only the dampening stands in for what the data did not show, so the default takes at least 2n tokens
GPTQ_TOKENS_PER_INPUT = 2


OPTIONS = {
    "engine": "streamed (default: qlora-bridge's GPTQ, one decoder layer in memory at a time), gptqmodel or "
              "autoround (both load the whole model)",
    "algorithm": "awq target only: gptq (GPTQ's asymmetric rounding, written as AWQ GEMM; default) or awq (AWQ's "
                 "activation-aware scale search, by gptqmodel unless engine=autoround)",
    "group_size": "32, 64 or 128 input channels per scale (pins a fixed recipe; its default 32)",
    "samples": "calibration blocks", "seq_len": "tokens per calibration block (default 512)",
    "calibration": "a JSONL dataset or a .txt file (default: the fine-tune's training data)",
    "text_tokens": "general text added to the calibration, in tokens",
    "iters": "AutoRound's SignRound steps per block; 0 rounds to nearest",
    "grid": "AutoRound AWQ's scale exponents", "dtype": "float16 or bfloat16: what the checkpoint stores",
    "damp": "GPTQ (streamed or gptqmodel): Hessian dampening, a fraction of its mean diagonal (default 0.05)",
    "true_sequential": "GPTQ (streamed or gptqmodel), 0 or 1: quantize each layer's module subsets in turn, each "
                       "seeing the ones before it already quantized (one forward of the calibration per subset)",
    "keep": "GPTQ (streamed or gptqmodel): decoder Linears left unquantized in dtype, by module name, "
            "comma-separated, or none (awq's fixed recipe: q_proj,k_proj,v_proj)",
    "recipe": "auto (the default with the streamed engine and held-out answers: the fewest bits whose measured "
              "figures stay inside the gate's bounds by a margin, recipe.py) or fixed (group_size, keep or the "
              "target's defaults)",
    "max_bits": "recipe=auto's budget in bits per decoder weight (default 8): above it the export fails with "
                "the closest figures"}


def option(req: ExportRequest, key: str, default, parse=int, allowed=None):
    raw = req.options.get(key)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise BridgeError(f"{key}={raw!r} is not a valid {parse.__name__}", field=f"--option {key}",
                          fix=f"e.g. --option {key}={default}") from None
    if allowed is not None and value not in allowed:
        raise BridgeError(f"{key}={raw} is not supported", field=f"--option {key}",
                          fix=f"use one of {', '.join(map(str, allowed))}")
    return value


def linear_shapes(merged: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder-layer Linear the quantizer will pack, from the safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                if name.endswith(".weight") and any(k in name for k in LAYER_KINDS):
                    shape = h.get_slice(name).get_shape()
                    if len(shape) == 2:
                        shapes[name[: -len(".weight")]] = tuple(shape)
    return shapes


def choose_group(req: ExportRequest, widths: dict[str, int]) -> int:
    """The group size, as asked or DEFAULT_GROUP; it must divide every layer's input width. A group that does not
    cannot be written as whole groups: AWQ refuses it and GPTQ writes a short last group that vLLM's CPU kernel
    rejects (576-wide SmolLM2 and groups of 128, research fact 12)."""
    group = option(req, "group_size", DEFAULT_GROUP, allowed=GROUPS)
    sizes = sorted(set(widths.values()))
    misfit = [w for w in sizes if w % group]
    if misfit:
        fits = next((g for g in GROUPS if not any(w % g for w in sizes)), None)
        raise BridgeError(f"group size {group} does not divide the input width {misfit[0]} of some layers "
                          f"(widths: {sizes})", field="--option group_size",
                          fix=f"use --option group_size={fits}" if fits else
                          "this model cannot be packed in whole groups; export it as gguf or safetensors")
    return group


def kept_modules(req: ExportRequest, widths: dict[str, int], default: str) -> list[str]:
    """The decoder Linears left unquantized, in the checkpoint's float dtype: those named by the keep option
    (module names, comma-separated: q_proj,k_proj,v_proj; none for no module), or by the target's default.
    A default that names modules this architecture does not have keeps nothing; a keep option that does is refused."""
    raw = req.options.get("keep", default)
    kinds = {k.strip() for k in raw.split(",") if k.strip()} - {"none"}
    present = {name.rpartition(".")[2] for name in widths}
    unknown = sorted(kinds - present)
    if unknown and "keep" in req.options:
        raise BridgeError(f"keep={raw}: this model has no decoder Linear named {', '.join(unknown)}",
                          field="--option keep", fix=f"name some of: {', '.join(sorted(present))}")
    kinds &= present
    for fused in FUSED:
        here = [k for k in fused if k in present]
        if kinds.intersection(here) and not kinds.issuperset(here):
            raise BridgeError(f"keep={raw} keeps part of {'+'.join(here)}, which vLLM runs as one Linear with one "
                              "quantization scheme", field="--option keep", fix=f"keep all of {','.join(here)} or none")
    if kinds == present:
        raise BridgeError(f"keep={raw} leaves no layer to quantize", field="--option keep",
                          fix="keep fewer modules, or export --target safetensors")
    return sorted(name for name in widths if name.rpartition(".")[2] in kinds)


def export(req: ExportRequest, method: str) -> ExportResult:
    """Every option checked, the calibration drawn, then one recipe written (fixed) or the recipes searched (auto)."""
    from transformers import AutoTokenizer

    from . import recipe as auto

    bits = int(req.quant.removeprefix("int"))
    shapes = linear_shapes(req.merged)
    if not shapes:
        raise BridgeError("found no decoder-layer Linear weights to quantize", file=req.merged,
                          fix="pass a merged Hugging Face causal LM folder")
    widths = {name: shape[1] for name, shape in shapes.items()}
    s = settings_of(req, method, widths)
    if s.mode == "fixed":
        group = choose_group(req, widths)
        kept = kept_modules(req, widths, SETTINGS[method, s.algorithm].get("keep", ""))
        kinds = {name.rpartition(".")[2] for name in kept}
    tok = AutoTokenizer.from_pretrained(req.merged, trust_remote_code=False)
    sequences, calib = calibration(req, tok, s.samples, s.seq_len, s.text_tokens)

    with engine_log(req.log) as console:  # the engines' own output and loggers; our bar and notes on the console
        console = console if req.progress else None

        def write(group: int, kinds) -> ExportResult:  # one recipe: the group size, the module kinds kept
            keep = tuple(sorted(name for name in widths if name.rpartition(".")[2] in kinds))
            job = Job(merged=req.merged, out=req.out, method=method, bits=bits, group=group, sequences=sequences,
                      dtype=s.dtype, console=console, damp=s.damp, iters=s.iters, grid=s.grid,
                      algorithm=s.algorithm, keep=keep, sequential=s.sequential)
            return quantize_and_check(job, s.engine, widths)

        if s.mode == "fixed":
            result = write(group, kinds)
            result.settings["recipe"] = {"mode": "fixed", "why": s.why_fixed}
        else:
            say = (lambda text: print(text, file=console)) if console else (lambda text: None)
            result, chosen = search_recipe(req, auto.space(req, write, logits, shapes, bits, GROUPS, FUSED),
                                           BOUNDS[req.quant], s.max_bits, say)
            result.settings["recipe"] = chosen
    result.settings.update(calibration=calib, dtype=s.dtype)
    return result


@dataclass(frozen=True)
class Settings:
    """An export's settings, every option read and checked against the others before any work."""
    engine: str
    algorithm: str  # how the weights are rounded: gptq, or awq's scale search
    samples: int
    seq_len: int
    text_tokens: int
    dtype: str
    iters: int
    damp: float
    sequential: bool
    grid: int
    mode: str  # recipe=auto or fixed
    why_fixed: str
    max_bits: float


def settings_of(req: ExportRequest, method: str, widths: dict[str, int]) -> Settings:
    defaults = DEFAULTS[method]
    engine = option(req, "engine", AWQ_ENGINE if req.options.get("algorithm") == "awq" else defaults["engine"],
                    parse=str, allowed=tuple(ENGINES))
    algorithm = method
    if method == "awq":
        algorithm = option(req, "algorithm", defaults["algorithm"] if engine in GPTQ_ENGINES else "awq",
                           parse=str, allowed=("awq", "gptq"))
        if algorithm == "gptq" and engine not in GPTQ_ENGINES:
            raise BridgeError(f"algorithm=gptq for AWQ is GPTQ's rounding, asymmetric; {engine} has no such setting",
                              field="--option algorithm",
                              fix="drop engine (the streamed default does it), or use --option engine=gptqmodel")
    elif "algorithm" in req.options:
        raise BridgeError("algorithm chooses how an AWQ export's weights are rounded; the gptq target is GPTQ's own",
                          field="--option algorithm", fix="drop algorithm, or export --target awq")
    gptq = engine in GPTQ_ENGINES and algorithm == "gptq"
    settings = SETTINGS[method, algorithm]
    seq_len = option(req, "seq_len", 512)
    floor = -(-GPTQ_TOKENS_PER_INPUT * max(widths.values()) // seq_len) if gptq else 0
    iters = option(req, "iters", 0)
    if iters and engine != "autoround":
        raise BridgeError(f"iters={iters} is AutoRound's SignRound; the {engine} engine has no such setting",
                          field="--option iters", fix="add --option engine=autoround, or drop iters")
    for key in ("damp", "true_sequential", "keep"):
        if key in req.options and not gptq:
            raise BridgeError(f"{key} is a setting of GPTQ; {engine}'s {algorithm} has no such setting",
                              field=f"--option {key}", fix=f"drop {key}, or drop engine and algorithm (the streamed "
                              "default is GPTQ)")
    mode, why_fixed = recipe_mode(req, engine)
    return Settings(engine=engine, algorithm=algorithm, samples=option(req, "samples", max(settings["samples"], floor)),
                    seq_len=seq_len, text_tokens=option(req, "text_tokens", settings["text_tokens"]),
                    dtype=option(req, "dtype", "float16", parse=str, allowed=("float16", "bfloat16")), iters=iters,
                    damp=option(req, "damp", 0.05, parse=float),
                    sequential=bool(option(req, "true_sequential", settings["true_sequential"], allowed=(0, 1))),
                    grid=option(req, "grid", AWQ_GRID), mode=mode, why_fixed=why_fixed,
                    max_bits=option(req, "max_bits", MAX_BITS, parse=float))


def recipe_mode(req: ExportRequest, engine: str) -> tuple[str, str]:
    """(auto or fixed, why fixed). auto by default: the streamed engine, held-out answers in the lineage to measure
    against, and neither group_size nor keep given (they pin a fixed recipe)."""
    from qlora_bridge.api import Lineage

    lineage = Lineage.from_json(req.lineage)
    answers = (lineage.merge.heldout_answers if lineage.merge else []) or \
        (lineage.training_record.heldout_answers if lineage.training_record else [])
    pinned = [k for k in ("group_size", "keep") if k in req.options]
    if pinned:
        why, fix = f"{pinned[0]} pins it", f"drop {pinned[0]}"
    elif engine != "streamed":
        why, fix = f"each step is a whole export, and {engine} loads the whole model for each", "drop engine"
    elif not answers:
        why, fix = "the lineage has no held-out answers to measure against", "train and merge with a held-out set"
    else:
        why, fix = "", ""
    asked = option(req, "recipe", None, parse=str, allowed=("auto", "fixed"))
    if asked == "auto" and why:
        raise BridgeError(f"recipe=auto cannot choose the recipe: {why}", field="--option recipe",
                          fix=f"{fix}, or drop recipe=auto")
    mode = asked or ("fixed" if why else "auto")
    if mode == "fixed" and "max_bits" in req.options:
        raise BridgeError(f"max_bits is recipe=auto's budget, and this export runs the fixed recipe "
                          f"({why or 'recipe=fixed'})", field="--option max_bits", fix="drop max_bits")
    return mode, why or "recipe=fixed"


def quantize_and_check(job: Job, engine: str, widths: dict[str, int]) -> ExportResult:
    """Write the export with the job's recipe into job.out, then read it back: the format, every layer against the
    merged weight, the kept layers, and the whole model on the reference text. Raises CheckFailed where it is off."""
    from .readback import MAX_LAYER_ERROR, MAX_PPL_RATIO, bits_per_weight, kept_errors, layer_errors, logits_check

    t0 = time.time()
    if job.console and engine != "streamed":
        print(f"quantizing with {engine} {version(engine)}, the whole model (its own output goes to the log)",
              file=job.console)
    library = ENGINES[engine](job)
    t_quantize = time.time() - t0
    for name in TOKENIZER_FILES:  # the merged folder's tokenizer is the one parity was proven on
        if (job.merged / name).is_file():
            shutil.copy2(job.merged / name, job.out / name)
    qc = json.loads((job.out / "config.json").read_text()).get("quantization_config") or {}
    want = {"quant_method": job.method, "bits": job.bits, "group_size": job.group,
            **({"checkpoint_format": "gptq"} if job.method == "gptq" else {"version": "gemm", "zero_point": True})}
    wrong = {k: qc.get(k) for k, v in want.items() if qc.get(k) != v}
    if wrong:
        raise CheckFailed(f"the written quantization_config has {wrong}, expected {want}",
                          file=job.out / "config.json", fix="report this: the quantizer wrote another format")
    try:
        errors = layer_errors(job.out, job.merged, smoothed=job.algorithm == "awq", console=job.console)
        unquantized = kept_errors(job.out, job.merged, list(job.keep))
        logits = logits_check(job.out, job.merged, REFERENCE_TEXT, console=job.console)
    except ValueError as e:
        raise CheckFailed(f"read-back failed: {e}", file=job.out, fix="nothing was kept; report this") from None
    if not logits["ppl_dequantized"] <= MAX_PPL_RATIO * logits["ppl_merged"]:
        raise CheckFailed(f"read-back failed: the dequantized model's perplexity on the reference text is "
                          f"{logits['ppl_dequantized']:.4g}, the merged model's {logits['ppl_merged']:.4g} (at most "
                          f"{MAX_PPL_RATIO}x is allowed)", file=job.out, fix="nothing was kept; report this")
    missing = sorted(set(widths) - set(errors) - set(job.keep))
    if missing:
        raise CheckFailed(f"{len(missing)} layers were not packed (first: {missing[0]})", file=job.out,
                          fix="report this: the quantizer skipped layers")
    t_check = time.time() - t0 - t_quantize
    worst = max(errors, key=errors.get)
    checks = {"quantization_config": qc, "read_back": {
        "reader": "qlora-bridge formats.py (independent of the quantizer)", "layers": len(errors),
        "mean_rel_error": round(sum(errors.values()) / len(errors), 5), "worst_layer": worst,
        "worst_rel_error": errors[worst], "max_allowed": MAX_LAYER_ERROR[job.method], "layer_errors": errors,
        "awq_smoothing_fitted": job.algorithm == "awq", "unquantized_layers": unquantized,
        "bits_per_weight": bits_per_weight(job.out, job.merged, sorted(widths))},
        "dequantized_model": {**logits, "max_ppl_ratio": MAX_PPL_RATIO}}
    return ExportResult(settings={"bits": job.bits, "group_size": job.group, "engine": engine,
                                  "engine_version": version(engine), **library,
                                  "seconds_quantize": round(t_quantize, 2), "seconds_check": round(t_check, 2)},
                        checks=checks)


def logits(folder: Path, sequences):
    """The export's logits as our reader dequantizes it (float32 compute): the weights it stores, not a kernel's,
    one layer dequantized at a time."""
    from .readback import dense_weights

    yield from model_logits(streamed_model(folder, dense_weights(folder)[0]), sequences)


def bits_per_weight(export: dict) -> float:
    """As the read-back counted them (codes, scales, zero points and the layers kept in 16 bits); an export older
    than that count: the codes plus one scale (16 bits) and one zero point per group."""
    counted = export["checks"].get("read_back", {}).get("bits_per_weight")
    bits, group = export["settings"]["bits"], export["settings"]["group_size"]
    return counted or round(bits + (16 + bits) / group, 3)


def summary(export: dict) -> list[str]:
    """What the terminal shows under the export: the recipe and how it was chosen, then what the read-back and
    (recipe=auto) the measurement found, against their limits."""
    settings, checks = export["settings"], export["checks"]
    read_back, model = checks["read_back"], checks["dequantized_model"]
    kept = settings.get("kept_unquantized") or []
    rounding = f"{settings['algorithm'].upper()}{'' if settings.get('sym', True) else ' asymmetric'}"
    ratio = model["ppl_dequantized"] / model["ppl_merged"]
    recipe = settings.get("recipe", {})
    how = (f"chosen by measurement, step {recipe['chosen']} of {len(recipe['steps'])} (recipe=auto)"
           if recipe.get("mode") == "auto" else f"fixed ({recipe['why']})" if recipe else "fixed")
    lines = [f"recipe: {rounding} by {settings['engine']}, {settings['bits']}-bit, groups of {settings['group_size']}"
             + (f", {', '.join(kept)} kept in {settings['dtype']}" if kept else "")
             + f": {bits_per_weight(export)} bits per decoder weight, {how}"]
    if recipe.get("mode") == "auto":
        lines.append(f"measured against the trained model (our dequantization, float32): "
                     f"{figures_line(recipe['steps'][-1]['figures'])}; aim: {recipe['margin']} of each bound")
    lines += [f"read back: weight error mean {read_back['mean_rel_error']:.3f}, "
              f"worst {read_back['worst_rel_error']:.3f} "
              f"(limit {read_back['max_allowed']}); perplexity on the reference text {ratio:.3f}x the merged model's "
              f"(limit {model['max_ppl_ratio']}x), same top-1 token {model['top1_agreement']:.1%}",
              "the gate's verdict, served: qlora-bridge smoke on this folder"]
    return lines


# torch, transformers and GPTQModel imported (GPTQModel pulls torchao and its kernels): measured on the demo
RUNTIME = 900 * 2**20
# the streamed engine's process: torch and transformers imported, the tokenizer, calibration and the model skeleton
# built (no quantization library), measured by bench/scale.py
RUNTIME_STREAMED = 400 * 2**20
SEQ_LEN = 512  # the default calibration block
TEXT_TOKENS = 1200  # the read-back's reference text, in tokens (1173 with the tiny model's tokenizer)


def calibration_tokens(shape: ModelShape) -> int:
    """The default calibration: enough 512-token blocks for twice the widest layer input (at least 8), and the awq
    target's 2048 tokens of general text."""
    widest = max(a for a, _ in shape.linears().values())
    blocks = max(8, -(-GPTQ_TOKENS_PER_INPUT * widest // SEQ_LEN))
    return blocks * SEQ_LEN + SETTINGS["awq", "gptq"]["text_tokens"]


def readback_need(shape: ModelShape) -> dict[str, int]:
    """The read-back's whole-model check (streamed_logits), at its peak: the second pass reading its largest module
    (the head: float32 beside the stored copy it is made from) while the first pass's logits are kept (measured on
    the 8B shape, bench/scale.py)."""
    module = max(shape.vocab * shape.hidden, sum(a * b for a, b in shape.linears().values()))
    return {"read-back: the largest module in float32, as read": module * (4 + shape.dtype_bytes),
            "read-back: logits of the reference text": TEXT_TOKENS * shape.vocab * 4}


def memory(target: str, shape: ModelShape, quant: str | None, gpu: bool) -> Need:
    """The default engine, streamed (streamed.py), holds one decoder layer at a time, and the default recipe=auto
    measures each step the same way (streamed_need). --option recipe=fixed drops the measurement; GPTQModel and
    AutoRound load the whole model (whole_model_memory), planned under their --option engine. Disk: the fixed
    recipe's checkpoint, or recipe=auto's at its budget (it keeps at most max_bits per decoder weight)."""
    fixed_disk = packed_bytes(shape, quant, SETTINGS[target, "gptq"]["keep"])
    auto = streamed_need(shape, quant, gpu, measured=True, disk=packed_bytes(shape, quant, max_bits=MAX_BITS))
    fixed = streamed_need(shape, quant, gpu, measured=False, disk=fixed_disk)
    whole = whole_model_memory(shape, quant, gpu, fix=auto, disk=fixed_disk)
    autoround = replace(whole, notes=("AutoRound planned as GPTQModel (both load the whole float32 model); "
                                      "not measured for AutoRound",))
    return replace(auto, variants=(("--option recipe=fixed", fixed), ("--option engine=gptqmodel", whole),
                                   ("--option engine=autoround", autoround)))


def streamed_need(shape: ModelShape, quant: str | None, gpu: bool, measured: bool, disk: int) -> Need:
    """The runtime, the calibration activations (a layer's inputs and outputs, float32) and the largest of the
    phases: the embedding as stored (first), one layer at work (its float32 weights, the widest input's Hessian and
    its group-aware permuted copy, the weight and what GPTQ makes of it, a forward batch), the read-back
    (readback_need), and with `measured` recipe=auto's measurement (a layer dequantized, a scoring batch's logits
    and log-probabilities). On a GPU the phases live there; the host reads one tensor at a time."""
    from .streamed import BATCH_TOKENS

    linears = shape.linears()
    widest = max(a for a, _ in linears.values())
    largest = shape.largest_linear
    layer_f32 = sum(a * b for a, b in linears.values()) * 4
    activations = 2 * calibration_tokens(shape) * shape.hidden * 4
    phases = [{"one layer, float32": layer_f32,
               "Hessian of its widest input and its permuted copy": 2 * widest * widest * 4,
               "the weight at work, its dequantized and packed forms": largest * (4 + 4 + 1 + 1),
               "a forward batch": BATCH_TOKENS * (3 * shape.intermediate + 4 * shape.hidden) * 4},
              {"the embedding as stored (first)": shape.vocab * shape.hidden * shape.dtype_bytes},
              readback_need(shape)]
    if measured:  # model_logits' batches of 2048 positions
        phases.append({"recipe=auto's measurement: a layer dequantized, float32": layer_f32,
                       "recipe=auto's measurement: a batch's logits and log-probabilities": 2 * 2048 * shape.vocab * 4})
    largest_phase = max(phases, key=lambda t: sum(t.values()))
    if gpu:
        device = {"CUDA context": CUDA_CONTEXT, "calibration activations": activations, **largest_phase}
        host = {"runtime": RUNTIME_STREAMED, "one tensor read": shape.largest_matrix * shape.dtype_bytes * 2}
    else:
        device = {}
        host = {"runtime": RUNTIME_STREAMED, "calibration activations": activations, **largest_phase}
    return Need(gpu=device, host=host, disk={f"{quant} checkpoint": disk}, output=disk,
                notes=(f"calibration {calibration_tokens(shape)} tokens",
                       "recipe=auto: each step an export, measured" if measured else "recipe=fixed"))


def whole_model_memory(shape: ModelShape, quant: str | None, gpu: bool, fix: Need, disk: int) -> Need:
    """GPTQModel loads the whole merged model on the host (float32 on a CPU, where GPTQ computes in float32; the
    merged dtype on a GPU), then quantizes one layer at a time on the device: that layer, a float32 Hessian per
    linear input (in x in) and the calibration activations entering and leaving it (float32 on the CPU). The
    read-back streams (readback_need). On an H200 (bench/gpu_e2e.py, the demo's 135M model) torch reserved 320 MiB
    (GPTQ) and 314 MiB (AWQ) beside these terms' 78 MiB: GPTQModel keeps more on the device than the layer at work,
    not yet broken down; the plan's GPU figure is a floor there. Where it does not fit, the plan names `fix`, the
    streamed engine."""
    weights = shape.params * (4 if not gpu else shape.dtype_bytes)
    layer_params = sum(a * b for a, b in shape.linears().values())
    hessians = 4 * sum(a * a for a, _ in shape.linears().values())
    activations = 2 * calibration_tokens(shape) * max(shape.hidden, shape.intermediate) * 4
    work = {"one layer": layer_params * 4, "Hessians of its inputs": hessians, "calibration activations": activations}
    quantizing = {"runtime": RUNTIME, "merged model loaded": weights, **({} if gpu else work)}
    host = max(quantizing, {"runtime": RUNTIME, **readback_need(shape)}, key=lambda t: sum(t.values()))
    return Need(gpu={"CUDA context": CUDA_CONTEXT, **work} if gpu else {}, host=host,
                disk={f"{quant} checkpoint": disk}, output=disk, variants=(("--option engine=streamed", fix),))


def packed_bytes(shape: ModelShape, quant: str | None, keep: str = "", max_bits: float | None = None) -> int:
    """The checkpoint: the decoder Linears packed in groups of 32 with `keep` (module names) in 16 bits, or at
    max_bits per weight, the rest in 16 bits."""
    from .recipe import recipe_bits

    bits = 8 if quant == "int8" else 4
    packed = recipe_bits(shape.linears(), bits, DEFAULT_GROUP, tuple(k for k in keep.split(",") if k))
    return int(shape.linear_params * max(packed, max_bits or 0) / 8 + shape.dense_params * 2)


def quant_method(folder) -> str | None:
    """What transformers' config says quantized a checkpoint made elsewhere ("gptq", "awq", ...)."""
    config = Path(folder) / "config.json"
    return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method") \
        if config.is_file() else None


@hookimpl
def register_exporters(register):
    register(Exporter(target="gptq", export=lambda req: export(req, "gptq"), format="gptq", logits=logits,
                      quant_types=("int4", "int8"), bounds=BOUNDS, options=OPTIONS,
                      path_options=("calibration",), library="transformers", bits_per_weight=bits_per_weight,
                      memory=partial(memory, "gptq"), summary=summary, declares=hf_declared,
                      recognizes=lambda folder: quant_method(folder) == "gptq",
                      description="GPTQ (checkpoint format v1, symmetric) for vLLM and transformers, by our GPTQ "
                                  "one decoder layer at a time, GPTQModel or AutoRound"))
    register(Exporter(target="awq", export=lambda req: export(req, "awq"), format="awq", quant_types=("int4",),
                      logits=logits, bounds={"int4": FOUR_BIT}, options=OPTIONS, path_options=("calibration",),
                      library="transformers", bits_per_weight=bits_per_weight, memory=partial(memory, "awq"),
                      summary=summary, declares=hf_declared,
                      recognizes=lambda folder: quant_method(folder) == "awq",
                      description="AWQ GEMM (4-bit, zero point) for vLLM and transformers, by our GPTQ one decoder "
                                  "layer at a time, GPTQModel or AutoRound"))
