"""`compare`: both merges, exported to the project's targets, held against the trained model."""

import json

import pytest
import torch

from qlora_bridge.cli import main
from qlora_bridge.measure.divergence import AnswerScorer, Teacher, full_scores
from test_project import project_file


def test_scorer_counts_what_greedy_decoding_would_do():
    # two records, prompt of 2 tokens and answers of 2 tokens: rows 1..2 of a 4-token sequence predict the answer
    teachers = [Teacher(1, [5, 6, 1, 2], [5, 6, 1, 2], 2), Teacher(2, [5, 7, 3, 4], [5, 7, 0, 4], 2)]
    vocab = 8
    scorer = AnswerScorer(teachers)
    assert len(scorer.inputs) == 3  # record 1's answer is the expected one: scored once
    logits = []
    for seq in scorer.inputs:
        lg = torch.zeros(len(seq), vocab)
        lg[torch.arange(len(seq) - 1), torch.tensor(seq[1:])] = 5.0  # top-1 is always the next token
        logits.append(lg)
    trained_logits = [lg.clone() for lg in logits]
    trained_logits[2] = logits[1].clone()  # the trained model answers record 2 with its kept answer, not the gold
    scorer.ref = scorer.reference_rows(trained_logits)
    same = scorer.score(map(full_scores, trained_logits))
    assert same["kl_mean"] == 0 and same["answers_kept"] == 2 and same["tokens"] == 4
    assert same["served_correct"] == same["reference_correct"] == [True, False]
    other = [lg.clone() for lg in trained_logits]
    other[1][1, 4] = 9.0  # record 2 now predicts token 4 where the trained model said 3
    got = scorer.score(map(full_scores, other))
    assert got["answers_kept"] == 1 and got["top1"] == 0.75 and got["kl_mean"] > 0.5
    assert sum(scorer.score(map(full_scores, logits))["served_correct"]) == 2  # greedy gives both expected answers


def test_compare_builds_both_merges_and_scores_every_target(tmp_path, tiny_model, capsys):
    path = project_file(tmp_path, tiny_model, extra='\n[[export]]\ntarget = "safetensors"\nquant = "float16"\n')
    assert main(["compare", "--project", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["target"], r["base_weights"]): r for r in report["rows"]}
    assert set(rows) == {(t, m) for t in ("merged (float32)", "gguf F16", "safetensors float16")
                         for m in ("nf4", "original")}
    n = report["trained"]["records"]
    assert n == 4 and report["trained"]["answers_kept"] == n
    for target in ("merged (float32)", "gguf F16", "safetensors float16"):
        nf4, original = rows[(target, "nf4")], rows[(target, "original")]
        # the nf4 merge is the trained model up to float rounding (float16 storage: ~1e-6 nats); merging into
        # the original weights adds the NF4 rounding error back (tiny model: ~7e-4 nats/token)
        assert nf4["kl"] < 1e-5 and nf4["answers_kept"] == n, target
        assert original["kl"] > 10 * max(nf4["kl"], 1e-6), target
        assert report["closer_to_trained"][target] == "nf4"
    assert report["merge_checks"]["original"]["rel_error"] > 1e-3
    assert (tmp_path / "out" / "compare-original" / "export-gguf-F16" / "manifest.json").is_file()
    assert "| gguf F16 | original |" in (tmp_path / "out" / "compare-report.md").read_text()


def test_compare_refuses_flags_it_would_ignore(tmp_path, tiny_model, capsys):
    """It works on the project's own stages: a merge's flags would be silently ignored, so they do not exist."""
    path = project_file(tmp_path, tiny_model)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--adapter", "x", "--project", str(path), "--json"])
    assert e.value.code == 2 and "unrecognized arguments: --adapter" in capsys.readouterr().err
