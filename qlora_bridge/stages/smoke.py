"""`qlora-bridge smoke`: serve an export, run every registered smoke check, record the results, gate a release.

PASSED must mean the fine-tune survived the export. The reference is the model that was trained (the 4-bit base
+ adapter), or the merged model when its merge check proved it equal to that (an exact nf4 float32 merge); an
export of a merge that was not proven equal is measured against the trained model itself. The served model is
measured through the engine that serves it (ServingAdapter.logprobs), teacher-forced along the reference's own
held-out answers and over an 8k-token reference text (qlora_bridge.measure.divergence): KL divergence, same top-1 share,
perplexity ratio, and the held-out task score beside the reference's on the same prompts with an exact McNemar
test. The bounds come from the exporter's registration for the export's quant type (Exporter.bounds); a quant
type it declares none for is gated by STRICT, and the results say which bounds were used and why.

Results go into the manifest's `verification.smoke-BACKEND` and a human-readable `smoke-report.md` in the folder
(both then listed in the manifest); the folder is re-signed when a key is given. Exit code 3 when a gating check
fails.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from .. import manifest as mf
from ..api import FLOAT_COPY, Bounds, Client, Declared, Exporter, Golden, SmokeContext
from ..errors import BridgeError, CheckFailed
from ..files import read_text
from ..host import Registry
from ..measure.declared import hf_declared
from ..measure.fidelity import measure_against
from ..measure.reference import reference_for
from ..modelcard import CARD, figures, render
from ..records import Lineage
from ..signing import sign
from .serve import failure, serving

# Bounds for a quant type no exporter vouches for: a float copy's. On the demo an F16 GGUF measured 3.4e-7
# nats/token along the held-out answers and 5.7e-6 on the text (perplexity x0.99995); Q8_0 4.9e-4 and 4.6e-3.
STRICT = replace(FLOAT_COPY, reason="strict defaults: no bounds declared for this quant type; a float copy meets them")
# The default golden suite generates through the server's chat endpoint, end to end; the statistics are the
# teacher-forced task score's, so a sample of held-out prompts the reference answers correctly is enough, and
# more than half of them must come back exactly (a base-model export answers none).
LINEAGE_GOLDEN = 16
LINEAGE_MIN_PASS_RATE = 0.5
MATCH_RULES = ("exact", "contains", "regex", "json")
REPORT = mf.SMOKE_REPORT


def load_suite(path: Path) -> tuple[list[Golden], float]:
    """A suite file: JSONL lines, or YAML with `min_pass_rate` and `prompts`; each item prompt/expected/match."""
    path = Path(path)
    if not path.is_file():
        raise BridgeError("suite file not found", file=path, fix="pass a .jsonl or .yaml suite")
    text = read_text(path, "suite file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise BridgeError(f"not valid YAML: {e}", file=path, fix="fix the YAML syntax") from None
        items, min_rate = data.get("prompts", []), float(data.get("min_pass_rate", 1.0))
    else:
        items, min_rate = [], 1.0
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BridgeError(f"line {n} is not valid JSON ({e.msg})", file=path,
                                      fix="one JSON object per line") from None
    suite = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "prompt" not in item or "expected" not in item:
            raise BridgeError(f"entry {i + 1} needs 'prompt' and 'expected'", file=path, field=f"prompts[{i}]",
                              fix='e.g. {"prompt": "2+2=", "expected": "4", "match": "contains"}')
        if item.get("match", "exact") not in MATCH_RULES:
            raise BridgeError(f"entry {i + 1} has match rule {item['match']!r}", file=path,
                              field=f"prompts[{i}].match", fix=f"use one of {', '.join(MATCH_RULES)}")
        suite.append(Golden(item["prompt"], str(item["expected"]), item.get("match", "exact")))
    if not suite:
        raise BridgeError("the suite has no prompts", file=path, fix="add at least one prompt")
    return suite, min_rate


def heldout_goldens(answers: list[dict]) -> list[Golden]:
    return [Golden(a["prompt"], a["expected"], "exact", a["got"]) for a in answers if "prompt" in a]


def gate_bounds(registry: Registry, manifest: dict, known=None) -> tuple[Bounds, str, Exporter | None]:
    """The bounds the export's own exporter declares for its quant type, else STRICT; where they came from; and
    that exporter, when it is installed. known: (Exporter, PluginInfo), where the caller has looked it up."""
    target, quant = manifest["export"]["target"], manifest["export"].get("quant")
    try:
        exporter, plugin = known or registry.exporter(target)
    except BridgeError:
        return STRICT, f"strict defaults: no installed exporter '{target}' declares bounds for {quant}", None
    if quant in exporter.bounds:
        return exporter.bounds[quant], f"declared by exporter '{target}' (plugin {plugin.name}) for {quant}", exporter
    return (STRICT, f"strict defaults: exporter '{target}' (plugin {plugin.name}) declares no bounds for {quant}",
            exporter)


def merged_folder(manifest: dict, override: Path | None) -> Path | None:
    if override:
        return Path(override)
    path = ((manifest.get("inputs") or {}).get("merged") or {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def merged_declarations(manifest: dict, merged: Path | None) -> Declared:
    """What the export is held to by the `declarations` check: the merged model's declarations (none where no
    merged folder is at hand), with the adapter the export's lineage names, the one the reference was trained with."""
    adapter = (Lineage.from_json(manifest.get("inputs")).adapter or {}).get("sha256")
    return replace(hf_declared(merged) if merged else Declared(), adapter_sha256=adapter)


def report_markdown(artifact: Path, result: dict) -> str:
    lines = [f"# Smoke test: {artifact.name}", "",
             f"- backend: {result['backend']}; server ready in {result['seconds_to_ready']} s",
             f"- result: **{'PASSED' if result['passed'] else 'FAILED'}**",
             f"- reference: {result['reference']}",
             f"- bounds ({result['bounds_source']}): {figures(result['bounds'])}", ""]
    if result["server_failure"]:
        cause, _, tail = result["server_failure"].partition("\n")
        lines += [f"**{cause}**", "", "```", tail, "```", ""]
    lines += ["| check | gate | passed | figures |", "|---|---|---|---|"]
    for name, r in result["checks"].items():
        passed = "yes" if r["passed"] else "**no**"
        lines.append(f"| {name} | {'yes' if r['gate'] else 'no'} | {passed} | {figures(r)} |")
    return "\n".join(lines) + "\n"


def check_unchanged(artifact: Path, manifest: dict) -> None:
    """Refuse an export folder whose files differ from its manifest's digests (the smoke report and model card,
    written into it after the export, aside): what is served or judged must be what was exported."""
    problems = [p for p in mf.compare_outputs(artifact, manifest)[0] if REPORT not in p and CARD not in p]
    if problems:
        raise CheckFailed(f"the folder no longer matches its manifest: {'; '.join(problems[:3])}", file=artifact,
                          fix="re-export it, or run `qlora-bridge verify` to see every difference")


def recorded(artifact: Path, manifest: dict, outcome: dict, license: str | None, library: str | None) -> None:
    """The outcome written into the folder: the smoke report, the manifest's verification (with the rewritten
    files' new digests) and the model card's figures (a card an exporter wrote itself is left alone)."""
    (artifact / REPORT).write_text(report_markdown(artifact, outcome))
    manifest["verification"][f"smoke-{outcome['backend']}"] = outcome
    card = artifact / CARD
    ours = not card.exists() or "quantized_by: qlora-bridge" in card.read_text(errors="replace")
    if ours:
        card.write_text(render(artifact.name, manifest, license, library))
    rewritten = (REPORT, CARD) if ours else (REPORT,)
    manifest["outputs"] = sorted([e for e in manifest["outputs"] if e["path"] not in rewritten]
                                 + [mf.output_entry(artifact, name) for name in rewritten], key=lambda e: e["path"])
    mf.write(artifact, manifest)


def smoke(registry: Registry, artifact: Path, backend: str, *, suite_file: Path | None = None,
          merged: Path | None = None, sign_key: Path | None = None, passphrase: bytes | None = None,
          options: dict | None = None, timeout: float = 300.0, license: str | None = None,
          request_timeout: float = 300.0, manifest: dict | None = None, exporter=None) -> dict:
    """Serve the export, run every smoke check against it, and record the outcome in its manifest, report and model
    card. manifest: the folder's, where the caller has read it (updated in place with the verification and the
    rewritten outputs, as written); exporter: (Exporter, PluginInfo) where the caller has looked it up."""
    artifact = Path(artifact)
    manifest = manifest if manifest is not None else mf.read(artifact)
    check_unchanged(artifact, manifest)  # results must describe the files the manifest describes
    quant = manifest["export"].get("quant") or manifest["export"]["format"]
    bounds, bounds_source, exporter = gate_bounds(registry, manifest, exporter)
    merged = merged_folder(manifest, merged)
    reference = reference_for(manifest, merged)  # before the server starts: a missing input is found at once
    heldout = heldout_goldens(reference.answers)
    merged_declared = merged_declarations(manifest, merged)
    if suite_file:
        suite, min_rate = load_suite(suite_file)
    else:  # golden by default: held-out prompts the reference answers correctly
        suite, min_rate = [g for g in heldout if g.passes(g.merged_answer)][:LINEAGE_GOLDEN], LINEAGE_MIN_PASS_RATE
    was_signed = (artifact / mf.SIGNATURE).is_file()
    log = artifact.parent / f"{artifact.name}.{backend}.log"
    started = time.time()
    checks, died = {}, None
    with serving(registry, backend, artifact, log=log, options=options, timeout=timeout,
                 fmt=manifest["export"]["format"]) as server:
        ctx = SmokeContext(Client(server.base_url, request_timeout), server, artifact, manifest, merged, suite,
                           min_rate, heldout, reference, bounds, bounds_source, exporter and exporter.declares,
                           merged_declared, measure_against)
        for check, plugin in registry.smoke_checks():
            began = time.time()
            died = died or failure(server, hang_wait=0)
            if died:  # one cause, said once: not a network error per check
                result = {"passed": False, "not_run": "the server died"}
            else:
                try:
                    result = dict(check.run(ctx))
                except Exception as e:  # a check that crashes has failed, and says why
                    died = failure(server)
                    result = {"passed": False, "error": "the server died during this check" if died
                              else f"{type(e).__name__}: {e}"}
            result.update(gate=check.gate, plugin=plugin.name, check_seconds=round(time.time() - began, 1))
            checks[check.name] = result
    outcome = {"backend": backend, "passed": not died and all(r["passed"] for r in checks.values() if r["gate"]),
               "server_failure": died, "quant": quant, "bounds": asdict(bounds), "bounds_source": bounds_source,
               "reference": reference.label, "seconds_to_ready": server.seconds_to_ready,
               "seconds": round(time.time() - started, 1), "server_log": log.name,
               "suite": str(suite_file) if suite_file else "lineage (held-out examples)", "checks": checks}
    recorded(artifact, manifest, outcome, license, exporter.library if exporter else None)
    if sign_key:
        sign(artifact, Path(sign_key), passphrase, manifest=manifest)
    outcome["signature"] = "re-signed" if sign_key else ("stale: re-sign with `qlora-bridge sign`" if was_signed
                                                          else "unsigned")
    return outcome
