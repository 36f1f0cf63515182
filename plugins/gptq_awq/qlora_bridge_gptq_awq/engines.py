"""What writes our GPTQ and AWQ checkpoints: GPTQModel, AutoRound, or our own layer-by-layer GPTQ (streamed.py).

Each engine quantizes a merged model on calibration token sequences and saves a checkpoint into `out`, in the
target's one on-disk format whichever engine wrote it (GPTQ checkpoint format v1, AWQ GEMM); it returns the
settings it ran with, for the manifest. What each costs and keeps on the demo: bench/quant_quality.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from qlora_bridge.api import BridgeError


@dataclass(frozen=True)
class Job:
    merged: Path
    out: Path
    method: str  # the target's format: "gptq" or "awq"
    algorithm: str  # how the weights are rounded: "gptq" (for awq: GPTQ's rounding, repacked) or "awq" (AWQ's scales)
    bits: int
    group: int
    sequences: list[list[int]]
    dtype: str  # what the checkpoint stores
    console: TextIO | None  # where our progress bar goes (the terminal); None: no bar
    damp: float = 0.05  # GPTQ's Hessian dampening, as a fraction of its mean diagonal
    iters: int = 0  # AutoRound: SignRound steps per block; 0 rounds to nearest
    grid: int = 20  # AutoRound AWQ: scale exponents tried per smoothing (each a forward of the layer's part)
    sequential: bool = True  # GPTQModel's GPTQ: true_sequential
    keep: tuple[str, ...] = ()  # GPTQModel's GPTQ: decoder Linears left unquantized, in `dtype`


@contextlib.contextmanager
def quiet(job: Job):
    """Both libraries report progress (and import-time notices) on stdout, which belongs to our --json output."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sys.stderr if job.console else sink):
        yield


def gptqmodel(job: Job) -> dict:
    # GPTQModel sizes its CPU worker pools from this at import time; its default of (cores+1)//2 is below
    # the 2 workers its model loader insists on for machines with 2 cores (research notes).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    from .formats import kept_rule

    try:
        import torch
        with quiet(job):
            from gptqmodel import GPTQModel
            from gptqmodel.looper import loop_processor
            from gptqmodel.quantization import FORMAT, AWQConfig, GPTQConfig
            from gptqmodel.utils.backend import BACKEND
    except ImportError as e:
        raise BridgeError(f"the {job.method} exporter's engine gptqmodel is not installed ({e})",
                          fix="pip install 'qlora-bridge[quant]'") from None
    on_gpu = torch.cuda.is_available()
    # A CPU without AVX512-BF16 multiplies bfloat16/float16 ~60x slower than float32 (measured: 967 vs 17 ms for
    # 512x576 @ 576x1536), so GPTQ on a CPU computes in float32 and the result is cast to `dtype` after. AWQ stays
    # in its supported half precision: forced to float32 (its modules declare fp16/bf16 only) it writes wrong
    # weights (demo: dequantized perplexity 180,000x the merged model's), and its time goes to elementwise clip
    # searches, not matmuls (two demo layers: 82 s in float16, 81 s in float32).
    gptq = job.algorithm == "gptq"
    compute = torch.float32 if gptq and not on_gpu else getattr(torch, job.dtype)
    if not on_gpu:
        keep_freed_memory()
    with quiet(job):  # the configs print notices too
        if gptq:
            # for the awq target: asymmetric, saved in format v2 (v1 cannot store a zero point of 0), then repacked
            sym = job.method == "gptq"
            kinds = sorted({name.rpartition(".")[2] for name in job.keep})
            config = GPTQConfig(bits=job.bits, group_size=job.group, desc_act=False, sym=sym,
                                damp_percent=job.damp, format=FORMAT.GPTQ if sym else FORMAT.GPTQ_V2,
                                true_sequential=job.sequential, dynamic=kept_rule(job.keep))
            library = {"algorithm": "gptq", "desc_act": False, "sym": sym, "damp_percent": job.damp,
                       "true_sequential": job.sequential, "kept_unquantized": kinds}
            backend = {}
        else:  # fallback=None: AWQ-scale every module, not just those that saw 0.5% of the calibration tokens
            config = AWQConfig(bits=job.bits, group_size=job.group, format=FORMAT.GEMM, sym=False, fallback=None)
            library = {"algorithm": "awq", "zero_point": True, "fallback": None,
                       "apply_clip": "always (hard-coded in GPTQModel 7.6)"}
            backend = {} if on_gpu else {"backend": BACKEND.AWQ_TORCH}
    # GPTQModel writes per-run logs into ./logs of whatever directory it runs in; keep them out of the user's
    scratch = tempfile.TemporaryDirectory(prefix="qlora-bridge-gptqmodel-")
    loop_processor._PROJECT_LOG_DIR = Path(scratch.name)
    with quiet(job), scratch:
        model = GPTQModel.load(str(job.merged), config, device="cuda" if on_gpu else "cpu",
                               dtype=compute, trust_remote_code=False)
        model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in job.sequences], batch_size=1,
                       **backend)
        model.save(str(job.out))
    if gptq and job.method == "awq":  # one pass over the shards: repacked and cast together
        repack_as_awq(job.out, job.group, f"gptqmodel {version('gptqmodel')}", getattr(torch, job.dtype), job.keep)
        library["repacked"] = "GPTQ checkpoint format v2 -> AWQ GEMM, by qlora-bridge (exact: same codes)"
    elif compute != getattr(torch, job.dtype):
        cast_floats(job.out, getattr(torch, job.dtype))
    return {**library, "device": "cuda" if on_gpu else "cpu", "compute_dtype": str(compute).removeprefix("torch.")}


def autoround(job: Job) -> dict:
    """AutoRound: AWQ's scale search (AWQ target) then round-to-nearest, or SignRound's tuned rounding (iters > 0).

    GPTQ is written symmetric (what every vLLM GPTQ kernel takes), AWQ with zero points (GEMM's layout).
    """
    try:
        import torch
        with quiet(job):
            from auto_round import AutoRound
            from auto_round.algorithms.transforms.awq.config import AWQConfig
            from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise BridgeError(f"the {job.method} exporter's engine autoround is not installed ({e})",
                          fix="pip install 'qlora-bridge[quant]'") from None
    on_gpu = torch.cuda.is_available()
    rounding = "signround" if job.iters else "rtn"
    sym = job.method == "gptq"
    # AWQ's clip search is off: GPTQModel's AWQ, which always runs it, took 2039 s for the demo on 2 cores (research
    # fact 14); AutoRound's own default leaves it off too.
    awq = {"duo_scaling": True, "n_grid": job.grid, "apply_clip": False}
    algorithms = [AWQConfig(**awq), rounding] if job.method == "awq" else rounding
    seq_len = max(map(len, job.sequences))
    with quiet(job):
        model = AutoModelForCausalLM.from_pretrained(job.merged, dtype=torch.float32, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(job.merged, trust_remote_code=False)
        ar = AutoRound(model, tokenizer=tok, scheme=f"W{job.bits}A16", alg_configs=algorithms, bits=job.bits,
                       group_size=job.group, sym=sym, iters=job.iters,
                       dataset=[torch.tensor([s]) for s in job.sequences], nsamples=len(job.sequences),
                       seqlen=seq_len, batch_size=min(8, len(job.sequences)), amp=on_gpu or fast_bf16(),
                       device_map="cuda" if on_gpu else "cpu")
        # AutoRound saves into a folder it names after the scheme, below the one it is given
        with tempfile.TemporaryDirectory(prefix="qlora-bridge-autoround-", dir=job.out.parent) as scratch:
            ar.quantize_and_save(scratch, format="auto_awq" if job.method == "awq" else "auto_gptq")
            written = {p.parent for p in Path(scratch).rglob("config.json")}
            if len(written) != 1:
                raise BridgeError(f"AutoRound wrote {len(written)} checkpoints, expected one", file=job.out,
                                  fix="report this")
            job.out.mkdir(parents=True, exist_ok=True)
            for f in written.pop().iterdir():
                shutil.move(str(f), job.out / f.name)
    if job.method == "gptq":  # AutoRound packs the classic v1 layout but does not say so; our reader checks it
        config_file = job.out / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"].setdefault("checkpoint_format", "gptq")
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    if job.dtype != "float16":  # AutoRound stores float16
        cast_floats(job.out, getattr(torch, job.dtype))
    return {"algorithm": "awq" if job.method == "awq" else rounding, "rounding": rounding, "iters": job.iters,
            "sym": sym, **({"awq": awq} if job.method == "awq" else {}), "device": "cuda" if on_gpu else "cpu",
            "compute_dtype": "float32"}


def streamed(job: Job) -> dict:
    """Ours: GPTQ one decoder layer at a time from the merged shards (streamed.py); memory is one layer."""
    import torch

    from .streamed import quantize

    if job.algorithm != "gptq":
        raise BridgeError("the streamed engine rounds with GPTQ only", field="--option algorithm",
                          fix="drop algorithm (awq: GPTQ's rounding, asymmetric, written as AWQ GEMM), or use "
                              "--option engine=autoround for AWQ's scale search")
    job.out.mkdir(parents=True, exist_ok=True)
    return quantize(job.merged, job.out, method=job.method, bits=job.bits, group=job.group, sequences=job.sequences,
                    dtype=getattr(torch, job.dtype), damp=job.damp, sequential=job.sequential, keep=job.keep,
                    console=job.console)


ENGINES = {"gptqmodel": gptqmodel, "autoround": autoround, "streamed": streamed}


def repack_as_awq(folder: Path, group: int, quantizer: str, dtype, keep=()) -> None:
    """Rewrite an asymmetric 4-bit GPTQ checkpoint (format v2, no act-order) as AWQ GEMM with its floating tensors
    in `dtype`: the codes, zero points and scales stay as they are (formats.py), only the packing changes. The
    modules in `keep` were left unquantized; AWQ's config names them (formats.awq_config)."""
    from .formats import awq_config, awq_pack, gptq_codes

    def repack(state):
        for name in [k for k in state if k.endswith(".qweight")]:
            prefix = name[: -len(".qweight")]
            q, z = gptq_codes(state[name], state[f"{prefix}.qzeros"], 4, v1=False)
            state[name], state[f"{prefix}.qzeros"] = awq_pack(q, z)
            state.pop(f"{prefix}.g_idx", None)
        return floats_in(state, dtype)

    rewrite_shards(folder, repack)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = awq_config(group, keep, f"{quantizer}: GPTQ, asymmetric, repacked by qlora-bridge")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "quantize_config.json").unlink(missing_ok=True)  # GPTQModel's, which would call it GPTQ


def version(package: str) -> str:
    from importlib.metadata import version

    return version({"autoround": "auto-round", "streamed": "qlora-bridge"}.get(package, package))


def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware. AutoRound computes in bfloat16 on any CPU by default;
    without AVX512-BF16 or AMX a bfloat16 matmul is ~40x slower than a float32 one (4096x576 @ 576x1536 on this
    project's AVX2 machine: 0.5 against 23 GFLOP/s)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def rewrite_shards(folder: Path, edit) -> None:
    """Replace each safetensors file of `folder` by edit(its tensors), through a temporary file."""
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        save_file(edit(load_file(f)), f.with_suffix(".tmp"), metadata={"format": "pt"})
        os.replace(f.with_suffix(".tmp"), f)


def floats_in(state: dict, dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def cast_floats(folder: Path, dtype) -> None:
    """Store every floating tensor (scales, norms, embeddings) in `dtype`."""
    rewrite_shards(folder, lambda state: floats_in(state, dtype))
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
