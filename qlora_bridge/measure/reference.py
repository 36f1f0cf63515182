"""The reference an export is held against, and its next-token distributions, computed once and cached.

The reference is the model that was trained (the 4-bit base + adapter, float32 compute), or the merged model when
its merge check proved it equal to that (an exact nf4 float32 merge) and the export read exactly the shards that
merge wrote (a folder with a copied merge report cannot vouch for itself). Its distributions along the held-out answers
and the reference document cost as much as scoring an export (~23k tokens for the demo: ~2 minutes on 2 cores),
and are the same for every export of one merge, so they are kept (the TOP_K most likely tokens and the actual one
per position, ~15 MB for the demo) under QLORA_BRIDGE_CACHE/references, keyed by the reference's file digests,
the scored token sequences and this module's VERSION. A merged model is checked against the digests its export
recorded before it is scored, so a cache entry always describes the files named in its key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import BridgeError
from ..records import Lineage

VERSION = 1  # of what is cached: bump when the sequences, the rows or the sparsity change


@dataclass
class Reference:
    """The model a served export is held against, and its own greedy answers to the held-out prompts."""
    label: str
    answers: list[dict]  # {line, prompt, expected, got}
    load: Callable[[], object]  # the model (transformers / peft), computing in float32
    identity: dict  # what the model is made of (file digests, settings): the cache key's first part
    verify: Callable[[], None] = lambda: None  # raises when the files differ from `identity`


def reference_for(manifest: dict, merged: Path | None) -> Reference:
    """The merged model where its merge check proved it equal to the trained model, else the trained model."""
    lin = Lineage.from_json(manifest.get("inputs"))
    report, record = lin.merge, lin.training_record
    check = report.check if report else {}
    trained_answers = record.heldout_answers if record else []
    merged_answers = report.heldout_answers if report else []
    proven = bool(check.get("passed")) and check.get("limit") is not None and report.base_weights == "nf4"
    files = lin.merged.get("files") or {}
    written = report.weights if report else {}
    shards = {name: digest for name, digest in files.items() if name.endswith(".safetensors")}
    if merged is not None and proven and written and shards == written:
        from .logits import folder_model

        return Reference(f"the merged model {merged} (its merge check proved it equal to the trained model: "
                         f"relative logits error {check['rel_error']:.1e})", merged_answers or trained_answers,
                         lambda: folder_model(merged), {"merged": files}, lambda: verify_files(merged, files))
    base, adapter = record.base_path if record else Path("-"), lin.adapter or {}
    adapter_dir = Path(adapter.get("path") or "-")
    if (base / "config.json").is_file() and (adapter_dir / "adapter_config.json").is_file():
        from ..models import trained_model

        why = ("the export's lineage has no merge report" if not report
               else "its merge was not proven equal to it" if not proven
               else "the merged weights the export read are not the ones its merge wrote" if written
               else "its merge report predates recording the merged weights' digests")
        identity = {"base": record.base.get("files") if record else None, "adapter": adapter.get("sha256"),
                    "quantization": record.quantization if record else None}
        return Reference(f"the trained model (4-bit base {base} + adapter {adapter_dir}, float32 compute): {why}",
                         trained_answers, lambda: trained_model(base, adapter_dir, record), identity)
    raise BridgeError("no reference to measure this export against: the merged model it came from is not "
                      "available as proven equal to the trained model, nor are the base and adapter",
                      file=merged or base, fix="pass --merged DIR (a merge whose check passed), or keep the base "
                      "model and adapter where the lineage in manifest.json says they are")


def verify_files(folder: Path, files: dict[str, str]) -> None:
    from ..files import sha256_file

    changed = [name for name, digest in files.items() if sha256_file(folder / name) != digest]
    if changed:
        raise BridgeError(f"the merged model changed since this export was made ({', '.join(changed[:3])})",
                          file=folder, fix="re-export from the merged model as it is, or restore it")


@dataclass
class ReferenceScores:
    scorer: object  # divergence.AnswerScorer with the reference's answer rows set
    windows: list[list[int]]  # the reference document's token windows
    text: list  # the reference's TokenScores over each window
    seconds: float  # to compute them (0.0: from the cache)
    cached: Path


def reference_scores(reference: Reference, tok, *, progress: bool = True) -> ReferenceScores:
    """The reference's distributions along its held-out answers and the reference document, from the cache or
    computed (and cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    from .scores import TokenScores
    from ..corpus import reference_document
    from ..files import cache_dir
    from .divergence import TOP_K, WINDOW, AnswerScorer, teacher_sequences, text_reference, text_windows
    from .logits import model_logits

    if not reference.answers:
        raise BridgeError("the lineage has no held-out answers of the reference model",
                          fix="train and merge with a held-out set ([data] heldout or --heldout FILE)")
    scorer = AnswerScorer(teacher_sequences(tok, reference.answers))
    windows = text_windows(tok, reference_document())
    key = hashlib.sha256(json.dumps({"version": VERSION, "reference": reference.identity, "k": TOP_K,
                                     "window": WINDOW, "answers": scorer.inputs, "starts": scorer.starts,
                                     "windows": windows}, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / "references" / f"{key[:32]}.safetensors"
    groups = {"answers": len(scorer.inputs), "text": len(windows)}
    if path.is_file():
        stored = load_file(path)
        rows = {}
        for group, count in groups.items():
            sizes = stored[f"{group}.rows"].tolist()
            ids, logp = stored[f"{group}.ids"].split(sizes), stored[f"{group}.logprobs"].split(sizes)
            rows[group] = [TokenScores(lp, i.long()) for lp, i in zip(logp, ids)]
        scorer.ref = rows["answers"]
        return ReferenceScores(scorer, windows, rows["text"], 0.0, path)
    started = time.time()
    if progress:
        print(f"score  {reference.label}: {len(scorer.inputs)} held-out sequences and {len(windows)} text windows "
              f"(once; cached in {path.parent})", file=sys.stderr, flush=True)
    reference.verify()
    model = reference.load()
    scorer.ref = scorer.reference_rows(model_logits(model, scorer.inputs))
    text = text_reference(windows, model_logits(model, windows))
    del model
    tensors = {}
    for group, rows in (("answers", scorer.ref), ("text", text)):
        tensors[f"{group}.ids"] = torch.cat([r.ids for r in rows]).int()
        tensors[f"{group}.logprobs"] = torch.cat([r.logprobs for r in rows]).contiguous()
        tensors[f"{group}.rows"] = torch.tensor([r.ids.shape[0] for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file(tensors, tmp, metadata={"reference": reference.label, "key": key})
    os.replace(tmp, path)
    return ReferenceScores(scorer, windows, text, round(time.time() - started, 1), path)
