"""The records the stages hand each other, each with one writer and one reader here (no torch: `verify` and the
CLI read them cheaply).

- training_record.json: written by train into the adapter folder, copied by merge into the merged folder. What
  training measured and what the exact merge relies on: the base's path and file digests, the quantization
  settings and NF4 fingerprint, the dataset's digest, the loss curve, the held-out answers before and after.
- merge_report.json: written by merge into the merged folder. How the merge was done (base weights, dtype) and
  what its equivalence check and held-out comparison measured.
- the lineage: what a merged folder says about where it came from (its files' digests and the two records). An
  export receives it (ExportRequest.lineage) and its manifest carries it as `inputs`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BridgeError
from .files import sha256_file, write_json

TRAINING_RECORD = "training_record.json"
MERGE_REPORT = "merge_report.json"
# what every reader relies on: a record without these was not written by a finished stage of this tool
REQUIRED = {TRAINING_RECORD: ("base",), MERGE_REPORT: ("base_weights", "dtype", "check")}


def _read(folder: Path, name: str, required: bool) -> dict | None:
    path = Path(folder) / name
    if not path.is_file():
        if required:
            raise BridgeError(f"no {name} here", file=path, fix="pass a folder written by qlora-bridge (train "
                              "writes the adapter's record, merge the merged folder's report)")
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BridgeError(f"not valid JSON ({e})", file=path, fix="re-run the stage that wrote it") from None
    missing = [k for k in REQUIRED[name] if k not in record]
    if missing:
        raise BridgeError(f"{name} lacks {', '.join(missing)}", file=path, field=missing[0],
                          fix="re-run the stage that wrote it with this version of qlora-bridge")
    return record


def read_training_record(folder: Path, required: bool = True) -> dict | None:
    return _read(folder, TRAINING_RECORD, required)


def write_training_record(folder: Path, record: dict) -> None:
    write_json(Path(folder) / TRAINING_RECORD, record)


def read_merge_report(folder: Path, required: bool = True) -> dict | None:
    return _read(folder, MERGE_REPORT, required)


def write_merge_report(folder: Path, report: dict) -> None:
    write_json(Path(folder) / MERGE_REPORT, report)


def heldout_answers(record: dict | None) -> list[dict]:
    """The trained model's answers to the held-out prompts, as training scored them (none without a held-out set)."""
    return (((record or {}).get("heldout") or {}).get("after") or {}).get("answers") or []


def lineage(merged: Path) -> dict:
    """What the merged folder says about where it came from: its files, the merge report, the training record."""
    merged = Path(merged)
    report = read_merge_report(merged, required=False)
    record = read_training_record(merged, required=False)
    files = {p.name: sha256_file(p) for p in sorted(merged.iterdir()) if p.is_file()}
    return {
        "merged": {"path": str(merged.resolve()), "files": files},
        "base": (report or {}).get("base") or (record or {}).get("base"),
        "adapter": (report or {}).get("adapter"),
        "merge": report,
        "training_record": record,
    }
