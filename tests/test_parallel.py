"""Data-parallel training: two processes (gloo on CPU) against one with the same global batch, the exact merge of
what they trained, and the settings refused before any process starts."""

import json

import pytest
from conftest import chat, write_jsonl

from qlora_bridge.cli import main
from qlora_bridge.stages.merge import merge
from qlora_bridge.stages.train import TrainSettings, train

# No dropout: its masks come from each process's own random stream, so with dropout two processes train on
# different noise than one and the curves part by the noise, not by a bug.
SAME = dict(steps=6, learning_rate=3e-3, dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    # answers of different lengths: a per-process mean of means would differ from the global token mean
    return write_jsonl(d / "d.jsonl", [chat(f"request {i}", f'{{"n": {i}, "pad": "{"x" * (i % 5)}"}}')
                                       for i in range(16)])


@pytest.mark.slow
def test_two_processes_train_the_curve_of_one_with_the_same_global_batch(tiny_model, data, tmp_path):
    one = train(tiny_model, data, tmp_path / "one", TrainSettings(batch_size=8, **SAME), progress=False).record
    two = train(tiny_model, data, tmp_path / "two", TrainSettings(batch_size=4, processes=2, **SAME),
                progress=False).record
    print("one process:  ", one.loss_curve)
    print("two processes:", two.loss_curve)
    assert two.distributed == {"world_size": 2, "strategy": "ddp", "backend": "gloo", "launcher": "torchrun"}
    assert one.distributed["world_size"] == 1
    # Same records, same token-weighted loss, gradients all-reduced: only the order of float32 sums differs
    # (two partial sums instead of one, ~1e-7 relative per step); 1e-4 leaves room for Adam carrying that over 6
    # steps, while a wrong split (each process a mean over its own tokens) is off by ~1e-2 here.
    assert two.loss_curve == pytest.approx(one.loss_curve, rel=1e-4)
    assert one.loss_curve[-1] < one.loss_curve[0] * 0.8, "the run must learn for the comparison to mean much"
    assert two.quantization["fingerprint"] == one.quantization["fingerprint"]
    report = merge(tiny_model, tmp_path / "two", tmp_path / "merged", check="full", progress=False)
    assert report.fingerprint_verified and report.check["passed"]
    assert report.check["rel_error"] < 1e-5


@pytest.mark.parametrize("flags, field", [(["--processes", "0"], "processes"),
                                          (["--processes", "2", "--launcher", "accelerate"], "launcher"),
                                          (["--processes", "2", "--strategy", "fsdp"], "strategy"),
                                          (["--strategy", "fsdp"], "strategy")])
def test_parallel_settings_that_cannot_work_are_refused_before_a_process_starts(tiny_model, data, tmp_path, capsys,
                                                                                flags, field):
    code = main(["train", "--base", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "a"), "--json",
                 *flags])
    assert code == 2
    assert json.loads(capsys.readouterr().out)["field"] == field
    assert not (tmp_path / "a").exists()
