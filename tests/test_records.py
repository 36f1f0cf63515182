"""The typed records: what train and merge write is what their one reader gives back, a record missing what every
reader relies on is a clear error, and the lineage an exporter receives reads back as the same records."""

import json

import pytest

from qlora_bridge.cli import main
from qlora_bridge.errors import BridgeError
from qlora_bridge.records import (
    MERGE_REPORT,
    TRAINING_RECORD,
    Lineage,
    MergeReport,
    TrainingRecord,
    lineage,
    read_merge_report,
    read_training_record,
    write_merge_report,
    write_training_record,
)

RECORD = TrainingRecord(base={"path": "/models/base", "files": {"model.safetensors": "ab" * 32}},
                        quantization={"quant_type": "nf4", "double_quant": True, "device": "cpu"},
                        dataset={"path": "/data/train.jsonl", "sha256": "cd" * 32}, loss_curve=[1.5, 0.2],
                        heldout={"after": {"exact_match": 0.5, "answers": [{"line": 1, "got": "pong"}]}})
REPORT = MergeReport(base=RECORD.base, base_weights="nf4", dtype="float32",
                     check={"method": "full-model logits", "rel_error": 1.4e-6, "limit": 1e-4, "passed": True},
                     heldout={"answers": [{"line": 1, "got": "pong", "adapter_got": "pong"}]})


def test_each_record_reads_back_as_written_in_the_documented_order(tmp_path):
    write_training_record(tmp_path, RECORD)
    write_merge_report(tmp_path, REPORT)
    assert read_training_record(tmp_path) == RECORD and read_merge_report(tmp_path) == REPORT
    on_disk = json.loads((tmp_path / TRAINING_RECORD).read_text())
    assert list(on_disk)[:4] == ["tool", "settings", "quantization", "base"]
    assert RECORD.heldout_answers == [{"line": 1, "got": "pong"}] and RECORD.base_path.name == "base"
    # trained without quantization: the record has no quantization section at all, as merge expects
    plain = TrainingRecord(base=RECORD.base)
    assert "quantization" not in plain.to_json() and TrainingRecord.from_json(plain.to_json()) == plain


def test_a_record_missing_what_readers_rely_on_names_the_file_and_the_field(tmp_path, capsys):
    (tmp_path / MERGE_REPORT).write_text(json.dumps({"base": {}, "base_weights": "nf4", "dtype": "float32"}))
    with pytest.raises(BridgeError) as e:
        read_merge_report(tmp_path)
    assert e.value.field == "check" and str(tmp_path / MERGE_REPORT) in str(e.value.file)
    (tmp_path / TRAINING_RECORD).write_text("{not json")
    with pytest.raises(BridgeError, match="not valid JSON"):
        read_training_record(tmp_path)
    assert read_training_record(tmp_path / "elsewhere", required=False) is None
    (tmp_path / "config.json").write_text("{}")  # a merged folder as far as export can tell
    (tmp_path / TRAINING_RECORD).unlink()
    assert main(["export", "--merged", str(tmp_path), "--target", "safetensors", "--out", str(tmp_path / "x")]) == 2
    assert "merge_report.json lacks check" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_lineage_an_exporter_receives_reads_back_as_the_records(tmp_path):
    write_training_record(tmp_path, RECORD)
    write_merge_report(tmp_path, REPORT)
    sent = lineage(tmp_path).to_json()  # what ExportRequest.lineage and the manifest's inputs carry
    json.dumps(sent)  # plain JSON
    back = Lineage.from_json(sent)
    assert back.merge == REPORT and back.training_record == RECORD and back.base == RECORD.base
    assert set(back.merged["files"]) == {MERGE_REPORT, TRAINING_RECORD}
    assert back.merge.heldout_answers[0]["adapter_got"] == "pong"
    empty = Lineage.from_json(None)  # a folder made elsewhere: no records, no error
    assert empty.merge is None and empty.training_record is None
