"""Built-in exporter `gguf`: our own HF -> GGUF conversion on the `gguf` package, quantized by llama.cpp.

Uses only qlora_bridge.api. Every export proves three things before it is allowed to finish: llama.cpp tokenizes
the built-in corpus exactly as the Hugging Face tokenizer does, every tensor has the type that was asked for (or
the fallbacks are listed), and the lineage (base, adapter, merge mode, tool) is in the GGUF's metadata.
"""

import json
import os
import time
from pathlib import Path

from qlora_bridge.api import (BridgeError, CheckFailed, Exporter, ExportRequest, ExportResult, hookimpl,
                              merged_license)

PLUGIN_API = 1  # the plugin API this module was written for
FLOATS = ("F16", "F32", "BF16")


def quant_types():
    from .quantize import QUANTS

    return ("Q4_K_M", *FLOATS, *(q for q in QUANTS if q != "Q4_K_M"))


def lineage_metadata(req: ExportRequest) -> dict:
    from qlora_bridge import __version__

    lin = req.lineage
    merge = lin.get("merge") or {}
    base = (lin.get("base") or {}).get("path")
    return {"name": req.merged.name,
            "qlora_bridge.version": __version__,
            "qlora_bridge.base_model": base,
            "qlora_bridge.adapter_sha256": (lin.get("adapter") or {}).get("sha256"),
            "qlora_bridge.merge_base_weights": merge.get("base_weights"),
            "qlora_bridge.merge_dtype": merge.get("dtype"),
            "general.license": merged_license(req.merged)}


def export(req: ExportRequest) -> ExportResult:
    from .convert import architecture, convert
    from .quantize import check_quantized, inspect, quantize, require_llama_cpp
    from .vocab import choose_pre_tokenizer, parity

    require_llama_cpp()
    import gguf
    from transformers import AutoTokenizer

    config = json.loads((req.merged / "config.json").read_text())
    hf_arch, arch = architecture(config, req.merged / "config.json")
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)]
    try:
        threads = int(req.options.get("threads", os.cpu_count() or 1))
    except ValueError:
        raise BridgeError("threads must be an integer", field="--option threads", fix="e.g. --option threads=4") from None

    tok = AutoTokenizer.from_pretrained(req.merged, trust_remote_code=False)
    forced = req.options.get("pre_tokenizer")  # test a named pre-tokenizer instead of searching
    t0 = time.time()
    pre = choose_pre_tokenizer(req.merged, config, arch_name, tok, candidates=(forced,) if forced else None)
    t_parity = time.time() - t0
    outtype = req.quant if req.quant in FLOATS else "F16"
    final = req.out / f"model-{req.quant}.gguf"
    first = final if req.quant in FLOATS else req.out / "intermediate-F16.gguf"
    metadata = {k: v for k, v in lineage_metadata(req).items() if v is not None}
    conv = convert(req.merged, first, outtype, tok=tok, tokenizer_pre=pre["pre"], metadata=metadata)
    t_convert = time.time() - t0 - t_parity
    if req.quant in FLOATS:
        found = inspect(final)
        checks = {"quantization": {"requested": req.quant, "tensor_types": found["tensor_types"],
                                   "bpw_file": round(found["bpw_file"], 3),
                                   "bpw_matrices": round(found["bpw_matrices"], 3)}}
        t_quant = 0.0
    else:
        quantize(first, final, req.quant, threads)
        t_quant = time.time() - t0 - t_parity - t_convert
        first.unlink()
        checks = {"quantization": check_quantized(final, req.quant)}

    ok, wrong = parity(final, tok)
    if wrong:
        raise CheckFailed(f"the exported GGUF tokenizes {len(wrong)} corpus entries differently from the merged "
                          f"model (first: {wrong[0]!r})", file=final, field="tokenizer",
                          fix="report this: the pre-tokenizer chosen by parity did not survive conversion")
    reader = gguf.GGUFReader(str(final))
    template = reader.get_field("tokenizer.chat_template")
    checks.update({
        "tokenizer_parity": f"{ok}/{ok}", "pre_tokenizer": pre,
        "chat_template_carried": template is not None and template.contents() == (tok.chat_template or None),
        "lineage_metadata": sorted(k for k in metadata if k.startswith("qlora_bridge.")),
    })
    return ExportResult(settings={"quant": req.quant, "intermediate": None if req.quant in FLOATS else "F16",
                                  "threads": threads, "arch": conv["arch"], "gguf_arch": conv["gguf_arch"],
                                  "file": final.name, "seconds_parity": round(t_parity, 2),
                                  "seconds_convert": round(t_convert, 2), "seconds_quantize": round(t_quant, 2),
                                  "importance_matrix": None},
                        checks=checks)


def logits(folder, sequences):
    """llama.cpp's logits of the exported GGUF, every position, for each token sequence."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise BridgeError(f"expected one .gguf file, found {len(files)}", file=folder,
                          fix="pass a folder written by `qlora-bridge export --target gguf`")
    model = Llama(str(files[0]), logits_all=True, n_ctx=max(512, max(map(len, sequences)) + 8),
                  n_threads=os.cpu_count() or 1, verbose=False)
    try:
        for ids in sequences:
            model.reset()
            model.eval(ids)
            yield torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32))
    finally:
        model.close()


@hookimpl
def register_exporters(register):
    register(Exporter(target="gguf", export=export, format="gguf", quant_types=quant_types(), logits=logits,
                      description="GGUF for llama.cpp: F32/F16/BF16, Q8_0 and k-quants, tokenizer parity-checked"))
