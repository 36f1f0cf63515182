"""Quantization through llama.cpp, and the read-back that refuses to ship what was not asked for.

`llama_model_quantize` returns success even when every tensor fell back to F16 (rows not a multiple of 32) or
many k-quant tensors fell back to q5_0/q8_0 (rows not a multiple of 256). So the file is read back, every
tensor's type is counted, bits per weight are measured, and fallbacks are reported.

With an importance matrix (imatrix.py), quantizing runs llama.cpp's own llama-quantize (tools.py): llama-cpp-python
cannot pass one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from qlora_bridge.api import BridgeError, CheckFailed

from qlora_bridge_llamacpp.build import refuse_faulting_build

# --quant name -> (llama.cpp file type, the tensor types it aims for, its nominal bits per weight)
QUANTS = {
    "Q8_0": ("MOSTLY_Q8_0", {"Q8_0"}, 8.5),
    "Q6_K": ("MOSTLY_Q6_K", {"Q6_K"}, 6.56),
    "Q5_K_M": ("MOSTLY_Q5_K_M", {"Q5_K", "Q6_K"}, 5.69),
    "Q5_K_S": ("MOSTLY_Q5_K_S", {"Q5_K"}, 5.5),
    "Q4_K_M": ("MOSTLY_Q4_K_M", {"Q4_K", "Q6_K"}, 4.85),
    "Q4_K_S": ("MOSTLY_Q4_K_S", {"Q4_K"}, 4.5),
    "Q4_0": ("MOSTLY_Q4_0", {"Q4_0"}, 4.5),
    "Q3_K_M": ("MOSTLY_Q3_K_M", {"Q3_K", "Q4_K", "Q5_K"}, 3.91),
    "Q3_K_S": ("MOSTLY_Q3_K_S", {"Q3_K"}, 3.5),
}

# llama.cpp's Q8_0 ignores an importance matrix; auto uses one where it measurably helped (the table in
# docs/gguf-and-the-gate.md)
TAKES_IMATRIX = frozenset(q for q in QUANTS if q != "Q8_0")
IMATRIX_DEFAULT = TAKES_IMATRIX
# The requested quantization "in substance": the decoder layers' matrices within 35% of nominal bits per weight. A
# few fallbacks to a neighbouring type (q5_0/q8_0 when rows are not multiples of 256, as on SmolLM2's 576-wide
# layers: 5.5 bpw for Q4_K_M) pass; a file whose matrices stayed F16 (16 bpw) does not. The vocabulary-sized
# embedding and output matrices are left out: llama.cpp gives them their own type (Q6_K for Q4_K_M's output, which
# a tied embedding shares), and on a small model with a large vocabulary they are most of the weights (Gemma 3
# 270M: 64%, at Q8_0 where 640 is not a multiple of 256; upstream's own Q4_K_M of it averages 7.4 bpw).
MAX_BPW_RATIO = 1.35
VOCAB_MATRICES = ("token_embd.weight", "output.weight")
FLOAT_TYPES = {"F32", "F16", "BF16"}


def quantize(src: Path, dst: Path, quant: str, threads: int, imatrix: Path | None = None, tools: Path | None = None,
             log: Path | None = None) -> None:
    if imatrix is not None:
        with open(log or "/dev/null", "a") as out:
            rc = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(src), str(dst), quant,
                                 str(threads)], stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise CheckFailed(f"llama-quantize could not quantize to {quant} with the importance matrix (exit {rc})",
                              file=src, fix="see llama.cpp's log (OUT.export.log, beside the output folder)")
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTS[quant][0]}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise CheckFailed(f"llama.cpp could not quantize to {quant} (return code {rc})", file=src,
                          fix="see llama.cpp's log (OUT.export.log, beside the output folder)")


def inspect(path: Path) -> dict:
    """Every tensor's type, and bits per weight of the matrices and of the whole file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: {"type": t.tensor_type.name, "ndim": len(t.shape), "params": int(t.n_elements),
                        "bytes": int(t.n_bytes)} for t in reader.tensors}
    mats = [v for v in tensors.values() if v["ndim"] >= 2]
    layers = [v for name, v in tensors.items() if v["ndim"] >= 2 and name not in VOCAB_MATRICES]
    total = sum(v["params"] for v in tensors.values())
    by_type: dict[str, int] = {}
    for v in tensors.values():
        by_type[v["type"]] = by_type.get(v["type"], 0) + 1
    return {"tensors": tensors, "tensor_types": dict(sorted(by_type.items())),
            "bpw_file": 8 * path.stat().st_size / total,
            "bpw_matrices": 8 * sum(v["bytes"] for v in mats) / sum(v["params"] for v in mats),
            "bpw_layers": 8 * sum(v["bytes"] for v in layers) / sum(v["params"] for v in layers)}


def check_quantized(path: Path, quant: str) -> dict:
    """Read the file back; fail when it is not `quant` in substance, and list every fallback."""
    found = inspect(path)
    _, wanted, nominal = QUANTS[quant]
    fallbacks = {name: v["type"] for name, v in found["tensors"].items() if v["ndim"] >= 2 and v["type"] not in wanted}
    report = {"requested": quant, "tensor_types": found["tensor_types"], "bpw_file": round(found["bpw_file"], 3),
              "bpw_matrices": round(found["bpw_matrices"], 3), "bpw_layers": round(found["bpw_layers"], 3),
              "bpw_nominal": nominal, "fallback_count": len(fallbacks), "fallbacks": dict(sorted(fallbacks.items()))}
    if found["bpw_layers"] > nominal * MAX_BPW_RATIO:
        floats = sum(1 for t in fallbacks.values() if t in FLOAT_TYPES)
        raise CheckFailed(f"the file is not {quant} in substance: its decoder layers average "
                          f"{found['bpw_layers']:.2f} bits per weight against {nominal} nominal; "
                          f"{len(fallbacks)} matrices fell back "
                          f"({floats} stayed unquantized)", file=path, field="--quant",
                          fix="rows must be multiples of 256 for k-quants and of 32 for Q8_0/Q4_0; pick a "
                          "quantization this model's shapes allow")
    return report


def require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise BridgeError("the GGUF exporter needs llama-cpp-python (a C++ build, ~4 min once)",
                          fix="pip install 'qlora-bridge[gguf]'") from None
    refuse_faulting_build()  # its read-back evaluates the quantized file in this process
