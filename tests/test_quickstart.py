"""The README's main job: QLoRA on the embedded model and the demo data must teach the skill."""

import json

import pytest

from qlora_bridge.cli import main

pytestmark = pytest.mark.slow


def test_demo_training_raises_heldout_exact_match(embedded_model, tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "adapter"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    before = out["record"]["heldout"]["before"]["exact_match"]
    after = out["record"]["heldout"]["after"]["exact_match"]
    # Measured 0% -> 70% on 40 held-out prompts; the base model never produces the house JSON shape. The bar
    # leaves room for run-to-run noise from thread scheduling while still failing a run that learned nothing.
    assert before <= 0.05
    assert after >= 0.4
