"""The records the stages hand each other: typed, each read and written here alone (no torch: `verify` and the CLI
read them cheaply). On disk they are JSON with the fields below, in this order.

- TrainingRecord (training_record.json): written by train into the adapter folder, copied by merge into the merged
  folder. What training measured and what the exact merge relies on: the base's path and file digests, the
  quantization settings and NF4 fingerprint, the dataset's digest, the loss curve, the held-out answers.
- MergeReport (merge_report.json): written by merge into the merged folder. How the merge was done (base weights,
  dtype) and what its equivalence check and held-out comparison measured.
- Lineage: what a merged folder says about where it came from (its files' digests and the two records). An export
  receives it as JSON (ExportRequest.lineage, which a plugin reads back with `Lineage.from_json`) and its manifest
  carries it as `inputs`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from . import __version__
from .errors import BridgeError
from .files import sha256_file, write_json

TRAINING_RECORD = "training_record.json"
MERGE_REPORT = "merge_report.json"


def _tool() -> dict:
    return {"name": "qlora-bridge", "version": __version__}


def _answers(heldout: dict | None, *keys: str) -> list[dict]:
    for key in keys:
        heldout = (heldout or {}).get(key)
    return (heldout or {}).get("answers") or []


class _Record:
    """JSON in and out; a field named in OMITTED is left out when None (no such section), as readers expect."""
    FILE: ClassVar[str]
    OMITTED: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k in self.OMITTED and v is None)}

    @classmethod
    def from_json(cls, data: dict, where: Path | None = None):
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise BridgeError(f"{cls.FILE} lacks {', '.join(missing)}", file=where, field=missing[0],
                              fix="re-run the stage that wrote it with this version of qlora-bridge")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class TrainingRecord(_Record):
    FILE: ClassVar[str] = TRAINING_RECORD
    OMITTED: ClassVar[tuple[str, ...]] = ("quantization",)  # trained without quantization: no NF4 to rebuild

    tool: dict = field(default_factory=_tool)
    settings: dict = field(default_factory=dict)  # TrainSettings as trained
    quantization: dict | None = None  # quant_type, double_quant, blocksize, compute_dtype, fingerprint, device
    base: dict  # path, files: {name: sha256}
    dataset: dict = field(default_factory=dict)  # path, sha256, shape, records, answer_tokens, ...
    optimizer: str | None = None
    steps: int = 0
    loss_curve: list[float] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)  # before/after: exact_match, n, answers; path
    peak_rss_mib: float | None = None
    distributed: dict = field(default_factory=dict)  # world_size, strategy, backend, launcher
    peak_cuda_mib: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    environment: dict = field(default_factory=dict)  # python, platform, libraries

    @property
    def base_path(self) -> Path:
        return Path(self.base["path"])

    @property
    def heldout_answers(self) -> list[dict]:
        """The trained model's answers to the held-out prompts, as training scored them (none without a held-out
        set)."""
        return _answers(self.heldout, "after")



@dataclass(frozen=True, kw_only=True)
class MergeReport(_Record):
    FILE: ClassVar[str] = MERGE_REPORT
    OMITTED: ClassVar[tuple[str, ...]] = ("heldout",)

    tool: dict = field(default_factory=_tool)
    base: dict  # path, files
    adapter: dict = field(default_factory=dict)  # path, sha256, rank, alpha
    base_weights: str  # nf4 or original
    dtype: str
    fingerprint_verified: bool = False
    nf4_rebuilt_on: str | None = None
    delta_kept_overall: float | None = None
    layers: dict = field(default_factory=dict)  # per merged weight: delta_norm, delta_kept per dtype, ...
    check: dict  # the equivalence check: method, rel_error, limit, passed, ...
    wall_seconds: float | None = None
    seconds: dict = field(default_factory=dict)
    peak_rss_mib: float | None = None
    peak_rss_mib_with_check: float | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    weights: dict = field(default_factory=dict)  # shard name -> sha256, what an export's reference checks
    threads: int | None = None
    environment: dict = field(default_factory=dict)
    heldout: dict | None = None  # the merged model's held-out answers beside the adapter's
    warnings: list = field(default_factory=list)  # what the user should know about how it was made

    @property
    def heldout_answers(self) -> list[dict]:
        return _answers(self.heldout)


@dataclass(frozen=True, kw_only=True)
class Lineage:
    merged: dict  # path, files: {name: sha256}
    base: dict | None = None
    adapter: dict | None = None
    merge: MergeReport | None = None
    training_record: TrainingRecord | None = None

    def to_json(self) -> dict:
        return {"merged": self.merged, "base": self.base, "adapter": self.adapter,
                "merge": self.merge.to_json() if self.merge else None,
                "training_record": self.training_record.to_json() if self.training_record else None}

    @classmethod
    def from_json(cls, data: dict | None) -> Lineage:
        """From an ExportRequest's lineage or a manifest's `inputs` (a manifest may predate either record)."""
        data = data or {}
        merge, record = data.get("merge"), data.get("training_record")
        return cls(merged=data.get("merged") or {}, base=data.get("base"), adapter=data.get("adapter"),
                   merge=MergeReport.from_json(merge) if merge else None,
                   training_record=TrainingRecord.from_json(record) if record else None)


def _read(cls, folder: Path, required: bool):
    path = Path(folder) / cls.FILE
    if not path.is_file():
        if required:
            raise BridgeError(f"no {cls.FILE} here", file=path, fix="pass a folder written by qlora-bridge (train "
                              "writes the adapter's record, merge the merged folder's report)")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BridgeError(f"not valid JSON ({e})", file=path, fix="re-run the stage that wrote it") from None
    return cls.from_json(data, path)


def read_training_record(folder: Path, required: bool = True) -> TrainingRecord | None:
    return _read(TrainingRecord, folder, required)


def write_training_record(folder: Path, record: TrainingRecord) -> None:
    write_json(Path(folder) / TRAINING_RECORD, record.to_json())


def read_merge_report(folder: Path, required: bool = True) -> MergeReport | None:
    return _read(MergeReport, folder, required)


def write_merge_report(folder: Path, report: MergeReport) -> None:
    write_json(Path(folder) / MERGE_REPORT, report.to_json())


def lineage(merged: Path) -> Lineage:
    """What the merged folder says about where it came from: its files, the merge report, the training record."""
    merged = Path(merged)
    report = read_merge_report(merged, required=False)
    record = read_training_record(merged, required=False)
    files = {p.name: sha256_file(p) for p in sorted(merged.iterdir()) if p.is_file()}
    return Lineage(merged={"path": str(merged.resolve()), "files": files},
                   base=report.base if report else record.base if record else None,
                   adapter=report.adapter if report else None, merge=report, training_record=record)
