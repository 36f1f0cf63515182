"""Built-in exporters `gptq` and `awq`: 4-bit (GPTQ also 8-bit) checkpoints for vLLM, written by GPTQModel.

GPTQModel 7.6 is the maintained library that writes both classic formats on a CPU (research notes,
awq-gptq-quantizers.md): GPTQ checkpoint format v1 and AWQ GEMM. Calibration defaults to the fine-tune's own
training data, tokenized as it was trained. Every export is read back with our own format reader
(formats.py) and compared with the merged weights layer by layer, then as a whole model; an export off the
scale fails and nothing is kept.

Options (--option KEY=VALUE): group_size (32, 64, 128; default 128, see choose_group), samples (default 128),
seq_len (default 512), calibration (a JSONL dataset or a .txt file; default: the training data),
dtype (float16 or bfloat16: what the checkpoint stores; on a GPU also what the quantizer computes in),
damp (GPTQ only).
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from qlora_bridge.api import (REFERENCE_TEXT, Bounds, BridgeError, CheckFailed, Exporter, ExportRequest,
                              ExportResult, hookimpl, model_logits, token_sequences)

PLUGIN_API = 2  # the plugin API this module was written for
# The smoke gate's bounds: a 4-bit export is held to what llama.cpp's Q4_K_M achieves on the same model, with a
# factor of two (the issue that set the 4-bit targets: "KL no more than twice the GGUF Q4_K_M's"), an 8-bit one
# to Q8_0's. On the demo Q4_K_M measured a KL of 5.2e-3 along the held-out answers and 0.058 on the reference text,
# Q8_0 4.9e-4 and 4.6e-3 (plugins/gguf).
INT4 = Bounds(kl_answers=0.01, kl_text=0.12, ppl_ratio=1.05, task_ratio=0.95,
              reason="2x the demo's GGUF Q4_K_M: KL 5.2e-3 along the answers, 0.058 on the text")
INT8 = Bounds(kl_answers=1e-3, kl_text=0.01, ppl_ratio=1.02, task_ratio=0.98,
              reason="about 2x the demo's GGUF Q8_0: KL 4.9e-4 along the answers, 4.6e-3 on the text")
GROUPS = (128, 64, 32)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
LAYER_KINDS = (".self_attn.", ".mlp.")  # GPTQModel quantizes the decoder layers' Linears, not embeddings or head


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


def linear_in_features(merged: Path) -> dict[str, int]:
    """Input width of every decoder-layer Linear the quantizer will pack, from the safetensors headers."""
    from safetensors import safe_open

    widths = {}
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                if name.endswith(".weight") and any(k in name for k in LAYER_KINDS):
                    shape = h.get_slice(name).get_shape()
                    if len(shape) == 2:
                        widths[name[: -len(".weight")]] = shape[1]
    return widths


def choose_group(req: ExportRequest, widths: dict[str, int]) -> tuple[int, str | None]:
    """The group size: as asked when given; by default 128, or the largest of 64/32 that divides every layer.

    A group that does not divide a layer's input width cannot be written as whole groups: AWQ refuses it and
    GPTQ writes a short last group that vLLM's CPU kernel rejects (576-wide SmolLM2, research fact 12).
    """
    asked = req.options.get("group_size")
    sizes = sorted(set(widths.values()))
    misfit = lambda g: [w for w in sizes if w % g]
    if asked is not None:
        group = option(req, "group_size", 128, allowed=GROUPS)
        if misfit(group):
            raise BridgeError(f"group size {group} does not divide the input width {misfit(group)[0]} of some "
                              f"layers (widths: {sizes})", field="--option group_size",
                              fix=f"use {next((g for g in GROUPS if not misfit(g)), 'another model')}, or leave "
                                  "group_size unset to pick one automatically")
        return group, None
    for group in GROUPS:
        if not misfit(group):
            reason = None if group == 128 else (f"128 does not divide the input width {misfit(128)[0]}; "
                                                f"{group} is the largest group size that divides {sizes}")
            return group, reason
    raise BridgeError(f"no group size of {GROUPS} divides every layer's input width ({sizes})", file=req.merged,
                      fix="this model cannot be packed in whole groups; export it as gguf or safetensors")


def calibration(req: ExportRequest, tok, samples: int, seq_len: int) -> tuple[list[list[int]], dict]:
    """Token id sequences to calibrate on, and where they came from (for the manifest)."""
    path = req.options.get("calibration")
    source = "option calibration"
    if path is None:
        record = (req.lineage.get("training_record") or {}).get("dataset") or {}
        path, source = record.get("path"), "the fine-tune's training data"
        if not path or not Path(path).is_file():
            raise BridgeError("no calibration data: the training data named in the merge's lineage is not here "
                              f"({path})", field="--option calibration",
                              fix="pass --option calibration=FILE (a JSONL dataset or a .txt file)")
    path = Path(path)
    if not path.is_file():
        raise BridgeError("calibration file not found", file=path, field="--option calibration",
                          fix="give a JSONL dataset (the training shapes) or a plain .txt file")
    if path.suffix == ".txt":
        ids = tok(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        sequences = [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)]
    else:
        sequences = token_sequences(path, tok, seq_len)
    # Short records are packed end to end into seq_len blocks, as AutoAWQ does: the quantizer's cost is per
    # block, and GPTQ needs many more tokens than a layer has inputs for a well-conditioned Hessian.
    stream = [t for s in sequences for t in s]
    blocks = [stream[i: i + seq_len] for i in range(0, len(stream), seq_len)]
    blocks = [b for b in blocks if len(b) >= min(seq_len, 64)]
    if not blocks:
        raise BridgeError(f"the calibration data has only {len(stream)} tokens", file=path,
                          field="--option calibration", fix="give more text, or lower --option seq_len")
    if len(blocks) > samples:  # spread over the whole file, deterministically
        step = len(blocks) / samples
        blocks = [blocks[int(i * step)] for i in range(samples)]
    return blocks, {"source": source, "path": str(path.resolve()),
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "records": len(sequences),
                    "samples": len(blocks), "tokens": sum(map(len, blocks)), "seq_len": seq_len,
                    "packed": "records concatenated and cut into seq_len blocks"}


def quantize(req: ExportRequest, method: str, bits: int, group: int, sequences, dtype: str) -> dict:
    """Run GPTQModel and save its checkpoint into req.out; returns the library settings used."""
    # GPTQModel sizes its CPU worker pools from this at import time; its default of (cores+1)//2 is below
    # the 2 workers its model loader insists on for machines with 2 cores (research notes).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    # GPTQModel reports progress (and import-time notices) on stdout, which belongs to our --json output
    quiet = contextlib.redirect_stdout(sys.stderr if req.progress else open(os.devnull, "w"))
    try:
        import torch
        with quiet:
            from gptqmodel import GPTQModel
            from gptqmodel.quantization import FORMAT, AWQConfig, GPTQConfig
            from gptqmodel.utils.backend import BACKEND
    except ImportError as e:
        raise BridgeError(f"the {method} exporter needs GPTQModel ({e})",
                          fix="pip install 'qlora-bridge[quant]'") from None
    on_gpu = torch.cuda.is_available()
    # A CPU without AVX512-BF16 multiplies bfloat16/float16 ~60x slower than float32 (measured: 967 vs 17 ms for
    # 512x576 @ 576x1536), so GPTQ on a CPU computes in float32 and the result is cast to `dtype` after. AWQ stays
    # in its supported half precision: forced to float32 (its modules declare fp16/bf16 only) it writes wrong
    # weights (demo: dequantized perplexity 180,000x the merged model's), and its time goes to elementwise clip
    # searches, not matmuls (two demo layers: 82 s in float16, 81 s in float32).
    compute = torch.float32 if method == "gptq" and not on_gpu else getattr(torch, dtype)
    if not on_gpu:
        keep_freed_memory()
    with quiet:  # the configs print notices too
        if method == "gptq":
            damp = option(req, "damp", 0.05, parse=float)
            config = GPTQConfig(bits=bits, group_size=group, desc_act=False, sym=True, damp_percent=damp)
            library = {"desc_act": False, "sym": True, "damp_percent": damp, "checkpoint_format": "gptq (v1)"}
            backend = {}
        else:  # fallback=None: AWQ-scale every module, not just those that saw 0.5% of the calibration tokens
            config = AWQConfig(bits=bits, group_size=group, format=FORMAT.GEMM, sym=False, fallback=None)
            library = {"zero_point": True, "version": "gemm", "fallback": None}
            backend = {} if on_gpu else {"backend": BACKEND.AWQ_TORCH}
    # GPTQModel writes per-run logs into ./logs of whatever directory it runs in; keep them out of the user's
    from gptqmodel.looper import loop_processor

    scratch = tempfile.TemporaryDirectory(prefix="qlora-bridge-gptqmodel-")
    loop_processor._PROJECT_LOG_DIR = Path(scratch.name)
    with quiet, scratch:
        model = GPTQModel.load(str(req.merged), config, device="cuda" if on_gpu else "cpu",
                               dtype=compute, trust_remote_code=False)
        model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in sequences], batch_size=1,
                       **backend)
        model.save(str(req.out))
    if compute != getattr(torch, dtype):
        cast_floats(req.out, getattr(torch, dtype))
    return {**library, "device": "cuda" if on_gpu else "cpu", "compute_dtype": str(compute).removeprefix("torch.")}


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of unmapping it (only on glibc; a no-op elsewhere).

    AWQ's clipping search allocates and frees ~75 MB temporaries thousands of times from worker threads, each with
    its own glibc arena that hands freed pages back to the kernel, which zeroes them again on the next allocation:
    two AWQ layers of the embedded model spent 41.7 of 146 CPU seconds in the kernel (17.3M page faults; raising
    the mmap and trim thresholds alone did not change that). With one arena as well: 2.6 s and 0.3M, and the run
    took 61 s instead of 88 s (bench/quant_malloc.py). The price: the process keeps its peak heap until it exits.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
    for option, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 31),
                          (M_TOP_PAD, 512 << 20)):
        mallopt(option, value)


def cast_floats(folder: Path, dtype) -> None:
    """Store every floating tensor (scales, norms, embeddings) in `dtype`, file by file through a temporary."""
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file(state, f.with_suffix(".tmp"), metadata={"format": "pt"})
        os.replace(f.with_suffix(".tmp"), f)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export(req: ExportRequest, method: str) -> ExportResult:
    from transformers import AutoTokenizer

    from .readback import MAX_LAYER_ERROR, MAX_PPL_RATIO, layer_errors, logits_check

    bits = int(req.quant.removeprefix("int"))
    widths = linear_in_features(req.merged)
    if not widths:
        raise BridgeError("found no decoder-layer Linear weights to quantize", file=req.merged,
                          fix="pass a merged Hugging Face causal LM folder")
    group, group_note = choose_group(req, widths)
    samples = option(req, "samples", 128)
    seq_len = option(req, "seq_len", 512)
    dtype = option(req, "dtype", "float16", parse=str, allowed=("float16", "bfloat16"))
    tok = AutoTokenizer.from_pretrained(req.merged, trust_remote_code=False)
    sequences, calib = calibration(req, tok, samples, seq_len)

    t0 = time.time()
    library = quantize(req, method, bits, group, sequences, dtype)
    t_quantize = time.time() - t0
    for name in TOKENIZER_FILES:  # the merged folder's tokenizer is the one parity was proven on
        if (req.merged / name).is_file():
            shutil.copy2(req.merged / name, req.out / name)
    qc = json.loads((req.out / "config.json").read_text()).get("quantization_config") or {}
    want = {"quant_method": method, "bits": bits, "group_size": group,
            **({"checkpoint_format": "gptq"} if method == "gptq" else {"version": "gemm", "zero_point": True})}
    wrong = {k: qc.get(k) for k, v in want.items() if qc.get(k) != v}
    if wrong:
        raise CheckFailed(f"the written quantization_config has {wrong}, expected {want}",
                          file=req.out / "config.json", fix="report this: the quantizer wrote another format")
    try:
        errors = layer_errors(req.out, req.merged)
        logits = logits_check(req.out, req.merged, REFERENCE_TEXT)
    except ValueError as e:
        raise CheckFailed(f"read-back failed: {e}", file=req.out, fix="nothing was kept; report this") from None
    if not logits["ppl_dequantized"] <= MAX_PPL_RATIO * logits["ppl_merged"]:
        raise CheckFailed(f"read-back failed: the dequantized model's perplexity on the reference text is "
                          f"{logits['ppl_dequantized']:.4g}, the merged model's {logits['ppl_merged']:.4g} (at most "
                          f"{MAX_PPL_RATIO}x is allowed)", file=req.out, fix="nothing was kept; report this")
    missing = sorted(set(widths) - set(errors))
    if missing:
        raise CheckFailed(f"{len(missing)} layers were not packed (first: {missing[0]})", file=req.out,
                          fix="report this: the quantizer skipped layers")
    t_check = time.time() - t0 - t_quantize
    worst = max(errors, key=errors.get)
    checks = {"quantization_config": qc, "read_back": {
        "reader": "qlora-bridge formats.py (independent of the quantizer)", "layers": len(errors),
        "mean_rel_error": round(sum(errors.values()) / len(errors), 5), "worst_layer": worst,
        "worst_rel_error": errors[worst], "max_allowed": MAX_LAYER_ERROR[method], "layer_errors": errors,
        "awq_smoothing_fitted": method == "awq"}, "dequantized_model": {**logits, "max_ppl_ratio": MAX_PPL_RATIO}}
    return ExportResult(settings={"bits": bits, "group_size": group, "group_size_note": group_note,
                                  "dtype": dtype, "calibration": calib, "library": "gptqmodel", **library,
                                  "seconds_quantize": round(t_quantize, 2), "seconds_check": round(t_check, 2)},
                        checks=checks)


def logits(folder: Path, sequences):
    """The export's logits as our reader dequantizes it (float32 compute): the weights it stores, not a kernel's."""
    from .readback import dense_model

    yield from model_logits(dense_model(folder), sequences)


@hookimpl
def register_exporters(register):
    register(Exporter(target="gptq", export=lambda req: export(req, "gptq"), format="gptq", logits=logits,
                      quant_types=("int4", "int8"), bounds={"int4": INT4, "int8": INT8},
                      description="GPTQ (checkpoint format v1, symmetric) for vLLM and transformers, via GPTQModel"))
    register(Exporter(target="awq", export=lambda req: export(req, "awq"), format="awq", quant_types=("int4",),
                      logits=logits, bounds={"int4": INT4},
                      description="AWQ GEMM (4-bit, zero point) for vLLM and transformers, via GPTQModel"))
