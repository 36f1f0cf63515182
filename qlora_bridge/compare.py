"""`qlora-bridge compare`: which base weights to merge into, measured per export target.

The adapter was trained against dequant(nf4(W)). Tools split between merging it there and into the original W,
and one claims the NF4 merge hurts. This builds both merges, exports each to the project's targets, and holds
every artifact against the model that was trained (the 4-bit base + adapter, float32 compute) on the held-out
prompts, teacher-forced along the trained model's own answers (its greedy answers recorded by `train`):

- KL divergence (nats per answer token) of the trained model's next-token distribution to the artifact's (the
  trained model's kept as its 128 most likely tokens per position: exact on those, grouped beyond; see
  qlora_bridge.measure.divergence);
- answers kept: records where the artifact's top-1 token is the trained model's at every answer position (and
  at the end of turn), i.e. greedy decoding would give the trained model's answer;
- exact match: the same along the expected answer, i.e. greedy decoding would give the expected answer.

Teacher forcing makes one forward pass per record measure what greedy decoding would do, for every artifact
alike. A target takes part when its exporter offers `Exporter.logits`; the others are listed as not compared.
"""

from __future__ import annotations

import sys
import time

from .errors import BridgeError
from .files import write_json
from .measure.divergence import AnswerScorer, full_scores, teacher_sequences
from .measure.logits import folder_logits, model_logits
from .pipeline import Pipeline
from .project import Project
from .records import read_merge_report, read_training_record
from .models import trained_model
from .stages.merge import MODES

REPORT = "compare-report"


def figures(scored: dict) -> dict:
    """An AnswerScorer result in this report's terms."""
    return {"kl": scored["kl_mean"], "top1_agreement": scored["top1"], "answers_kept": scored["answers_kept"],
            "exact_match": sum(scored["served_correct"]), "records": scored["records"],
            "answer_tokens": scored["tokens"]}


def compare(project: Project, registry, *, progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    for spec in project.exports:  # bad input, named by its line, before training
        spec.check(registry)
    pipe = Pipeline(project, registry, progress=progress)
    adapter = pipe.adapter()
    record = read_training_record(adapter)
    answers = record.heldout_answers
    if not answers:
        raise BridgeError("the comparison needs the trained model's held-out answers, and training ran without a "
                          "held-out set", file=project.path, field="data.heldout",
                          fix="set [data] heldout = FILE (chat or prompt/completion records) and run again")
    # the original-weights merge is built even when its own check fails: how far it strays is the finding
    merged = {mode: pipe.merged(mode, gate=mode == "nf4") for mode in MODES}
    checks = {mode: read_merge_report(folder).check for mode, folder in merged.items()}

    tok = AutoTokenizer.from_pretrained(merged["nf4"])
    scorer = AnswerScorer(teacher_sequences(tok, answers))
    say(f"run    trained model (4-bit base + adapter) on {len(answers)} held-out records")
    model = trained_model(record.base_path, adapter, record)
    scorer.ref = scorer.reference_rows(model_logits(model, scorer.inputs))
    del model

    artifacts = [(f"merged ({project.merge.get('dtype', 'float32')})", mode, merged[mode], None) for mode in MODES]
    skipped = []
    for spec in project.exports:
        resolved = registry.resolve_export(spec.target, spec=spec)
        exporter, label = resolved.exporter, f"{spec.target} {resolved.quant or ''}".strip()
        if exporter.logits is None:
            skipped.append({"target": label, "why": "its exporter offers no logits hook"})
            continue
        for mode in MODES:
            folder = pipe.export(resolved, merged[mode], under="" if mode == "nf4" else "compare-original")
            artifacts.append((label, mode, folder, exporter.logits))
    rows = []
    for label, mode, folder, logits in artifacts:
        say(f"score  {label} from the {mode} merge: {folder}")
        scored = scorer.score(map(full_scores, (logits or folder_logits)(folder, scorer.inputs)))
        rows.append({"target": label, "base_weights": mode, "path": str(folder), **figures(scored)})
    # the trained model against itself: every answer kept; its exact match is the reference side of any score
    trained = {**figures(scored), "kl": 0.0, "top1_agreement": 1.0, "answers_kept": scored["records"],
               "exact_match": sum(scored["reference_correct"])}
    closer = {}
    for label in dict.fromkeys(r["target"] for r in rows):
        pair = {r["base_weights"]: r for r in rows if r["target"] == label}
        closer[label] = min(pair, key=lambda m: pair[m]["kl"])
    report = {"reference": "the trained model: 4-bit base + adapter, float32 compute", "trained": trained,
              "merge_checks": checks, "rows": rows, "closer_to_trained": closer, "not_compared": skipped,
              "seconds": round(time.time() - started, 1)}
    write_json(project.out / f"{REPORT}.json", report)
    (project.out / f"{REPORT}.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    trained = report["trained"]
    n = trained["records"]
    lines = ["# Which base to merge into", "",
             f"Against {report['reference']}, teacher-forced on {n} held-out records ({trained['answer_tokens']} "
             f"answer tokens). The trained model itself: exact match {trained['exact_match']}/{n}.", "",
             "| target | merged into | KL to trained (nats/token) | top-1 agreement | answers kept | exact match |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['target']} | {r['base_weights']} | {r['kl']:.3g} | {r['top1_agreement']:.1%} | "
                     f"{r['answers_kept']}/{n} | {r['exact_match']}/{n} |")
    lines += ["", "Closer to the trained model (lower KL):", "",
              *(f"- {t}: the {m} merge" for t, m in report["closer_to_trained"].items())]
    for mode, c in report["merge_checks"].items():
        if "fine_tune_retained" in c:
            lines.append(f"- merge check, {mode}: relative logits error {c['rel_error']:.2e}, fine-tune effect "
                         f"retained {c['fine_tune_retained']:.1%}{'' if c['passed'] else ' (FAILED: not releasable)'}")
    lines += [f"- {s['target']}: not compared ({s['why']})" for s in report["not_compared"]]
    return "\n".join(lines) + "\n"
