"""The importance matrix, computed on the fine-tune's own training data.

llama.cpp's k-quants weigh each weight's rounding error by how strongly its input column is activated
(the mean of x² over calibration tokens). Tools that offer this download the base model's upstream matrix, made
on general text; here llama-imatrix runs the F16 intermediate of *this* fine-tune over the data it was trained on
(the calibration option's file instead, when given), followed by some general text, so that the rounding spares
what the fine-tune uses. The held-out answers the smoke gate scores are not in it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from qlora_bridge.api import BridgeError, CheckFailed, ExportRequest, calibration

from .quantize import IMATRIX_DEFAULT, TAKES_IMATRIX
from .tools import tools

CHUNK = 512  # tokens per llama-imatrix chunk (its default context); it needs at least two chunks
MAX_CHUNKS = 128  # 64k tokens: llama.cpp's imatrix guide calls 100-200 chunks of wikitext enough
TEXT_TOKENS = 4096  # general prose after the training data (CPython's docs, not the gate's reference document)
GENERAL_ONLY = 32768  # general prose alone when there is no training data


def plan(req: ExportRequest) -> str | None:
    """The imatrix option, checked before any work: None (quantize without), "auto", "on", or a file's path."""
    choice = req.options.get("imatrix", "auto")
    try:
        int(req.options.get("text_tokens", TEXT_TOKENS))
    except ValueError:
        raise BridgeError("text_tokens must be an integer", field="--option text_tokens",
                          fix="e.g. --option text_tokens=0 for the training data alone") from None
    if choice == "off" or (choice == "auto" and req.quant not in IMATRIX_DEFAULT):
        return None
    if req.quant not in TAKES_IMATRIX:
        raise BridgeError(f"llama.cpp's {req.quant} does not use an importance matrix", field="--option imatrix",
                          fix=f"drop the option; it applies to {', '.join(sorted(TAKES_IMATRIX))}")
    if choice not in ("auto", "on") and not Path(choice).is_file():
        raise BridgeError("importance matrix file not found", file=choice, field="--option imatrix",
                          fix="give a file written by llama-imatrix, or auto/on/off")
    return choice


def importance(req: ExportRequest, tok, f16: Path, threads: int, choice: str) -> tuple[Path, Path, dict]:
    """The importance matrix to quantize with, the llama.cpp tools to do it with, and the manifest's record."""
    bin_dir, version = tools(req.options.get("llama_cpp_sdist"), req.progress)
    if choice not in ("on", "auto"):
        file = Path(choice)
        return file, bin_dir, {"source": "file", "path": str(file.resolve()), "llama_cpp": version,
                               "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    out = req.out / "imatrix.gguf"  # a working file, as the F16 intermediate: deleted once used
    record = compute(req, tok, f16, out, threads, bin_dir, strict=choice == "on")
    return out, bin_dir, {**record, "llama_cpp": version}


def compute(req: ExportRequest, tok, f16: Path, out: Path, threads: int, tools: Path, strict: bool) -> dict:
    """llama-imatrix's statistics of the calibration data run through `f16`, written to `out`; the manifest's record
    of what went in and what came out. Not strict (imatrix=auto): without the training data on this machine, general
    text alone, as upstream's matrices are made."""
    from gguf import GGUFReader

    text_tokens = int(req.options.get("text_tokens", TEXT_TOKENS))
    blocks, record = calibration(req, tok, MAX_CHUNKS, CHUNK, text_tokens, instead=None if strict else GENERAL_ONLY)
    if sum(map(len, blocks)) < 2 * CHUNK:
        raise BridgeError(f"{sum(map(len, blocks))} calibration tokens; llama-imatrix needs at least {2 * CHUNK}",
                          file=record.get("path"), field="--option calibration",
                          fix="give more data, raise --option text_tokens, or --option imatrix=off")
    if req.progress:  # one pass of the model over the data: minutes on a CPU for a 1B model
        print(f"importance matrix: llama-imatrix over {sum(map(len, blocks))} tokens of {record['source']}",
              file=sys.stderr)
    # llama-imatrix reads text and tokenizes it itself (the parity check proves it tokenizes as Hugging Face does)
    text = "".join(tok.decode(b, skip_special_tokens=False) for b in blocks)
    corpus = out.with_suffix(".txt")
    corpus.write_text(text, encoding="utf-8")
    with open(req.log or "/dev/null", "a") as sink:
        rc = subprocess.run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(corpus), "-o", str(out),
                             "-c", str(CHUNK), "--no-ppl", "--parse-special", "-t", str(threads)],
                            stdout=sink, stderr=subprocess.STDOUT).returncode
    corpus.unlink()
    if rc != 0 or not out.is_file():
        raise CheckFailed(f"llama-imatrix failed (exit {rc}) on {record['tokens']} calibration tokens", file=f16,
                          fix=f"it needs at least {2 * CHUNK} tokens; see llama.cpp's log (OUT.export.log, beside "
                              "the output folder); or export with --option imatrix=off")
    reader = GGUFReader(str(out))
    value = lambda key: reader.get_field(key).contents() if reader.get_field(key) is not None else None
    return {"source": "computed", "calibration": record, "chunks": value("imatrix.chunk_count"),
            "chunk_tokens": value("imatrix.chunk_size"),
            "matrices": sum(1 for t in reader.tensors if t.name.endswith(".in_sum2")),
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "tool": "llama-imatrix"}


def applied(path: Path) -> int:
    """How many matrices llama-quantize says it quantized with importance data (from the file's own metadata)."""
    from gguf import GGUFReader

    entry = GGUFReader(str(path)).get_field("quantize.imatrix.entries_count")
    if entry is None or not entry.contents():
        raise CheckFailed("the quantized file records no importance matrix", file=path, field="--option imatrix",
                          fix="report this: llama-quantize was given one")
    return int(entry.contents())
