"""Calibration data for quantizers: the fine-tune's own training data, then general text.

    blocks, record = calibration(req, tok, samples=128, seq_len=512, text_tokens=2048)

The blocks are token id lists cut from the training records packed end to end (or from the file a user named with
--option calibration), followed by about text_tokens of general prose disjoint from the smoke gate's reference
document; the record says where each came from, with digests, for the manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .corpus import calibration_text
from .data import token_sequences
from .errors import BridgeError
from .records import Lineage


def calibration(req, tok, samples: int, seq_len: int, text_tokens: int,
                instead: int | None = None) -> tuple[list[list[int]], dict]:
    """Token id sequences to calibrate on, and where they came from (for the manifest): the fine-tune's data (or
    the calibration option's file) in seq_len blocks, then about text_tokens of general text after them. `req` is
    the exporter's ExportRequest: its lineage names the training data, its options may name another file.
    Without training data on this machine: an error, or with `instead`, that many tokens of general text alone."""
    path = req.options.get("calibration")
    source = "option calibration"
    if path is None:
        trained = Lineage.from_json(req.lineage).training_record
        path, source = trained.dataset.get("path") if trained else None, "the fine-tune's training data"
        if not path or not Path(path).is_file():
            why = (f"the training data named in the merge's lineage is not here ({path})" if path else
                   "the merge's lineage names no training data")
            if instead is None:
                raise BridgeError(f"no calibration data: {why}", field="--option calibration",
                                  fix="pass --option calibration=FILE (a JSONL dataset or a .txt file)")
            general, text_record = general_text(tok, seq_len, instead)
            return general, {"source": f"general text only: {why}", "tokens": sum(map(len, general)),
                             "seq_len": seq_len, "general_text": text_record}
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
    record = {"source": source, "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "records": len(sequences), "samples": len(blocks), "tokens": sum(map(len, blocks)), "seq_len": seq_len,
              "packed": "records concatenated and cut into seq_len blocks"}
    if text_tokens <= 0:
        return blocks, {**record, "general_text": None}
    general, record["general_text"] = general_text(tok, seq_len, text_tokens)
    return blocks + general, record


def general_text(tok, seq_len: int, tokens: int) -> tuple[list[list[int]], dict]:
    """About `tokens` of general prose in seq_len blocks, spread over calibration_text(), and their record."""
    text = calibration_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    want = min(len(blocks), -(-tokens // seq_len))
    blocks = [blocks[int(i * len(blocks) / want)] for i in range(want)]
    return blocks, {"source": "CPython's pydoc topics, without those of the smoke gate's reference document",
                    "sha256": hashlib.sha256(text.encode()).hexdigest(), "samples": len(blocks),
                    "tokens": sum(map(len, blocks))}
