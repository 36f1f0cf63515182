"""`qlora-bridge merge --compare`: which base weights to merge into, measured per export target.

The adapter was trained against dequant(nf4(W)). Tools split between merging it there and into the original W,
and one claims the NF4 merge hurts. This builds both merges, exports each to the project's targets, and holds
every artifact against the model that was trained (the 4-bit base + adapter, float32 compute) on the held-out
prompts, teacher-forced along the trained model's own answers (its greedy answers recorded by `train`):

- KL divergence (nats per answer token) of the trained model's next-token distribution to the artifact's;
- answers kept: records where the artifact's top-1 token is the trained model's at every answer position (and
  at the end of turn), i.e. greedy decoding would give the trained model's answer;
- exact match: the same along the expected answer, i.e. greedy decoding would give the expected answer.

Teacher forcing makes one forward pass per record measure what greedy decoding would do, for every artifact
alike. A target takes part when its exporter offers `Exporter.logits`; the others are listed as not compared.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import BridgeError
from .files import write_json
from .logits import folder_logits, model_logits
from .merge import MODES, trained_model
from .pipeline import Pipeline
from .project import Project

REPORT = "compare-report"


@dataclass
class Teacher:
    """One held-out record, tokenized twice: prompt + the trained model's answer, prompt + the expected one."""
    line: int
    kept: list[int]
    gold: list[int]
    start: int  # index of the first answer token in both sequences


def teacher_sequences(tok, answers: list[dict]) -> list[Teacher]:
    from .data import HeldOut
    from .evaluate import render_prompt

    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    answer = lambda text: tok(text.strip(), add_special_tokens=False)["input_ids"] + stop
    out = []
    for a in answers:
        chat = isinstance(a["prompt"], list)
        prompt = tok(render_prompt(tok, HeldOut(a["prompt"], a["expected"], a["line"])),
                     add_special_tokens=not chat)["input_ids"]
        out.append(Teacher(a["line"], prompt + answer(a["got"]), prompt + answer(a["expected"]), len(prompt)))
    return out


def answer_rows(teachers: list[Teacher], logits) -> Iterator[torch.Tensor]:
    """From logits of teacher sequences (kept answers, then expected ones): the rows that predict answer tokens."""
    for i, lg in enumerate(logits):
        t = teachers[i % len(teachers)]
        yield lg[t.start - 1: -1].float()  # position i predicts token i + 1


class Scorer:
    """Holds the trained model's log-probabilities along its own answers; scores any model's answer rows."""

    def __init__(self, teachers: list[Teacher], reference_rows: list[torch.Tensor]):
        self.teachers = teachers
        self.ref = [torch.log_softmax(rows, -1) for rows in reference_rows]

    def score(self, rows) -> dict:
        """rows: answer_rows of a model's logits for the kept-answer sequences, then the expected-answer ones."""
        n, kl_sum, tokens, same_top1, kept, exact = len(self.teachers), 0.0, 0, 0, 0, 0
        for i, got in enumerate(rows):
            t = self.teachers[i % n]
            if i < n:
                ref = self.ref[i]
                if got.shape != ref.shape:
                    raise BridgeError(f"the artifact's logits have shape {tuple(got.shape)} along held-out line "
                                      f"{t.line}, the trained model's {tuple(ref.shape)}",
                                      fix="the artifact has another vocabulary: compare artifacts of this model")
                kl_sum += (ref.exp() * (ref - torch.log_softmax(got, -1))).sum().item()
                tokens += ref.shape[0]
                agree = got.argmax(-1) == ref.argmax(-1)
                same_top1 += int(agree.sum())
                kept += bool(agree.all())
            else:
                exact += bool((got.argmax(-1) == torch.tensor(t.gold[t.start:])).all())
        # identical distributions sum to |KL| ~ 1e-8 in float32, either sign: report that as 0
        return {"kl": max(kl_sum / tokens, 0.0), "top1_agreement": same_top1 / tokens, "answers_kept": kept,
                "exact_match": exact, "records": n, "answer_tokens": tokens}


def compare(project: Project, registry, *, progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    pipe = Pipeline(project, registry, progress=progress)
    adapter = pipe.adapter()
    record = json.loads((adapter / "training_record.json").read_text())
    answers = ((record.get("heldout") or {}).get("after") or {}).get("answers")
    if not answers:
        raise BridgeError("the comparison needs the trained model's held-out answers, and training ran without a "
                          "held-out set", file=project.path, field="data.heldout",
                          fix="set [data] heldout = FILE (chat or prompt/completion records) and run again")
    # the original-weights merge is built even when its own check fails: how far it strays is the finding
    merged = {mode: pipe.merged(mode, gate=mode == "nf4") for mode in MODES}
    checks = {mode: json.loads((folder / "merge_report.json").read_text())["check"] for mode, folder in merged.items()}

    tok = AutoTokenizer.from_pretrained(merged["nf4"])
    teachers = teacher_sequences(tok, answers)
    say(f"run    trained model (4-bit base + adapter) on {len(teachers)} held-out records")
    model = trained_model(Path(record["base"]["path"]), adapter, record)
    sequences = [t.kept for t in teachers] + [t.gold for t in teachers]
    ref_rows = [r.clone() for r in answer_rows(teachers, model_logits(model, sequences))]  # clone: drop the prompts' rows
    del model
    scorer = Scorer(teachers, ref_rows[:len(teachers)])
    reference = scorer.score(ref_rows)
    del ref_rows

    artifacts = [(f"merged ({project.merge.get('dtype', 'float32')})", mode, merged[mode], None) for mode in MODES]
    skipped = []
    for spec in project.exports:
        exporter, _ = registry.exporter(spec.target)
        label = f"{spec.target} {spec.quant or (exporter.quant_types[0] if exporter.quant_types else '')}".strip()
        if exporter.logits is None:
            skipped.append({"target": label, "why": "its exporter offers no logits hook"})
            continue
        for mode in MODES:
            folder = pipe.export(spec, merged[mode], under="" if mode == "nf4" else "compare-original")
            artifacts.append((label, mode, folder, exporter.logits))
    rows = []
    for label, mode, folder, logits in artifacts:
        say(f"score  {label} from the {mode} merge: {folder}")
        rows.append({"target": label, "base_weights": mode, "path": str(folder),
                     **scorer.score(answer_rows(teachers, (logits or folder_logits)(folder, sequences)))})
    closer = {}
    for label in dict.fromkeys(r["target"] for r in rows):
        pair = {r["base_weights"]: r for r in rows if r["target"] == label}
        closer[label] = min(pair, key=lambda m: pair[m]["kl"])
    report = {"reference": "the trained model: 4-bit base + adapter, float32 compute", "trained": reference,
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
