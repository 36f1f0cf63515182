"""`merge --compare`: both merges, exported to the project's targets, held against the trained model."""

import json

import torch

from qlora_bridge.cli import main
from qlora_bridge.compare import Scorer, Teacher, answer_rows
from test_project import project_file


def test_scorer_counts_what_greedy_decoding_would_do():
    # two records, prompt of 2 tokens and answers of 2 tokens: rows 1..2 of a 4-token sequence predict the answer
    teachers = [Teacher(1, [5, 6, 1, 2], [5, 6, 1, 2], 2), Teacher(2, [5, 7, 3, 4], [5, 7, 0, 4], 2)]
    vocab = 8
    logits = []
    for t in teachers:
        for seq in (t.kept, t.gold):
            lg = torch.zeros(len(seq), vocab)
            lg[torch.arange(len(seq) - 1), torch.tensor(seq[1:])] = 5.0  # top-1 is always the next kept token
            logits.append(lg)
    logits = logits[0::2] + logits[1::2]  # kept sequences first, then the expected ones
    trained = Scorer(teachers, list(answer_rows(teachers, logits))[:2])
    same = trained.score(answer_rows(teachers, logits))
    assert same["kl"] == 0 and same["answers_kept"] == 2 and same["exact_match"] == 2 and same["answer_tokens"] == 4
    other = [lg.clone() for lg in logits]
    other[1][1, 4] = 9.0  # record 2 now predicts token 4 where the trained model said 3
    got = trained.score(answer_rows(teachers, other))
    assert got["answers_kept"] == 1 and got["top1_agreement"] == 0.75 and got["kl"] > 0.5


def test_compare_builds_both_merges_and_scores_every_target(tmp_path, tiny_model, capsys):
    path = project_file(tmp_path, tiny_model, extra='\n[[export]]\ntarget = "safetensors"\nquant = "float16"\n')
    assert main(["merge", "--compare", "--project", str(path), "--json"]) == 0
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
    path = project_file(tmp_path, tiny_model)
    assert main(["merge", "--compare", "--adapter", "x", "--project", str(path), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["field"] == "--adapter"
