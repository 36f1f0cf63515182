"""`qlora-bridge release`: train -> merge -> every export -> serve and smoke-test each -> sign -> report.

An artifact is signed only after its smoke gate passed. One that fails (or cannot be served here) is renamed
NAME.FAILED, its manifest says why, and it is never signed: nothing left behind looks releasable. The report
(release-report.md and .json in the output folder) has one row per artifact; the exit code is 3 if any failed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from . import manifest as mf
from .errors import BridgeError, CheckFailed
from .files import write_json, writer_lock
from .pipeline import Pipeline
from .plan import release_plan, shortfall
from .project import Project
from .signing import sign

REPORT = "release-report"
COLUMNS = ("artifact", "format", "size_mb", "bits_per_weight", "parity", "kl_answers", "kl_text", "top1_text",
           "ppl_ratio", "task_score", "agreement", "tokens_per_second", "signature", "status")


def bits_per_weight(exporter, manifest: dict) -> float | None:
    """Bits per weight of the export, as its exporter reads them off its manifest record (None: it does not say)."""
    return exporter.bits_per_weight(manifest["export"]) if exporter.bits_per_weight else None


def row(folder: Path, manifest: dict, bpw: float | None, smoke: dict | None, signature: str, status: str,
        note: str = "") -> dict:
    checks = (smoke or {}).get("checks") or {}
    get = lambda check, key: (checks.get(check) or {}).get(key)
    return {"artifact": folder.name, "format": f"{manifest['export']['format']} {manifest['export'].get('quant') or ''}"
            .strip(), "size_mb": round(sum(o["size"] for o in manifest["outputs"]) / 1e6, 1),
            "bits_per_weight": bpw, "parity": get("tokenization", "parity"),
            "kl_answers": get("divergence", "kl_answers"), "kl_text": get("divergence", "kl_text"),
            "top1_text": get("divergence", "top1_text"), "ppl_ratio": get("divergence", "ppl_ratio"),
            "task_score": get("task-score", "task_score"),
            "task_score_reference": get("task-score", "task_score_reference"),
            "task_interval": get("task-score", "interval_95"), "agreement": get("task-score", "agreement"),
            "tokens_per_second": get("speed", "tokens_per_second"), "signature": signature, "status": status,
            "backend": (smoke or {}).get("backend"), "path": str(folder), "note": note}


def mark_failed(folder: Path, manifest: dict, reason: str) -> Path:
    manifest["verification"]["release"] = {"status": "failed", "reason": reason,
                                           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    mf.write(folder, manifest)
    (folder / mf.SIGNATURE).unlink(missing_ok=True)  # a signature from an earlier, passing release
    failed = folder.with_name(folder.name + ".FAILED")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(folder, failed)
    return failed


def cell(r: dict, column: str) -> str:
    if r[column] is None:
        return "-"
    if column == "task_score":  # with the reference's score and the 95% interval of the paired difference
        return f"{r['task_score']} (ref {r['task_score_reference']}, diff {r['task_interval']})"
    return str(r[column])


def markdown(rows: list[dict], stages: list[dict], seconds: float) -> str:
    lines = ["# Release report", "",
             f"**{'PASSED' if rows and all(r['status'] == 'passed' for r in rows) else 'FAILED'}** "
             f"in {seconds:.0f} s", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, c) for c in COLUMNS) + " |")
    notes = [f"- {r['artifact']}: {r['note']}" for r in rows if r["note"]]
    lines += ["", *notes, "", "Stages:", "",
              *(f"- {s['stage']}: {'reused' if s['reused'] else 'ran'}" + (f" ({s['seconds']} s)" if "seconds" in s
                                                                            else "") for s in stages)]
    return "\n".join(lines) + "\n"


def release(project: Project, registry, *, progress: bool = True, passphrase: bytes | None = None) -> dict:
    from .stages.smoke import smoke

    if not project.exports:
        raise BridgeError("the project has no export targets", file=project.path, field="[[export]]",
                          fix='add an [[export]] table with target = "NAME" (`qlora-bridge plugins` lists the targets)')
    if project.sign_key and not project.sign_key.is_file():
        raise BridgeError("signing key not found", file=project.sign_key, field="sign.key",
                          fix="create it with `qlora-bridge keygen`")
    fit = release_plan(project, registry)  # minutes of training must not end in an out-of-memory kill
    if not fit["fits"]:
        what, fixes = shortfall(fit)
        raise CheckFailed(f"the release will not fit this machine: {what}", file=project.path, field="[train]",
                          fix=f"{fixes} (`qlora-bridge plan` shows every term)")
    with writer_lock(project.out, what="release folder"):  # one release of a project at a time
        started = time.time()
        pipe = Pipeline(project, registry, progress=progress)
        merged = pipe.merged()
        rows = []
        for spec in project.exports:
            resolved = registry.resolve_export(spec.target, spec=spec)  # decided once, handed down
            exporter = resolved.exporter
            folder = pipe.export(resolved, merged)
            manifest = mf.read(folder)  # read once: smoke records its verification in it, signing reads it
            result, note, backend = None, "", spec.backend
            try:
                backend = backend or registry.backend_for(exporter.format)
                result = smoke(registry, folder, backend, suite_file=project.suite,
                               options=spec.serve_options(registry.server(backend)[0]),
                               timeout=project.smoke_timeout, license=project.license, manifest=manifest,
                               exporter=(exporter, resolved.plugin))
                passed = result["passed"]
                if result["server_failure"]:  # one cause, not every check's network error
                    note = "failed: " + result["server_failure"].partition("\n")[0]
                elif not passed:
                    note = "failed: " + "; ".join(
                        f"{k} ({r.get('why') or r.get('error') or 'see smoke-report.md'})"
                        for k, r in result["checks"].items() if r["gate"] and not r["passed"])
            except BridgeError as e:  # could not be served here: not verified, so not releasable
                passed, note = False, f"not verified: {e.problem}"
            if passed:
                signature = "signed" if project.sign_key else "unsigned (no sign.key)"
                if project.sign_key:
                    sign(folder, project.sign_key, passphrase, manifest=manifest)
                rows.append(row(folder, manifest, bits_per_weight(exporter, manifest), result, signature, "passed"))
            else:
                pipe.forget(pipe.export_stage(folder))  # never reuse a failed artifact
                failed = mark_failed(folder, manifest, note)
                rows.append(row(failed, manifest, bits_per_weight(exporter, manifest), result, "not signed",
                                "FAILED", note))
            if progress:
                print(f"{rows[-1]['status']:<7}{folder.name} ({backend or 'no backend'}) {note}", flush=True,
                      file=sys.stderr)
        seconds = time.time() - started
        report = {"passed": all(r["status"] == "passed" for r in rows), "seconds": round(seconds, 1),
                  "rows": rows, "stages": pipe.log,
                  "project": str(project.path) if project.path else "embedded demo project"}
        (project.out / f"{REPORT}.md").write_text(markdown(rows, pipe.log, seconds))
        write_json(project.out / f"{REPORT}.json", report)
        return report

