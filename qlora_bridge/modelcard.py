"""The model card (README.md with Hugging Face front matter) every export folder carries.

Written by `export` from the manifest, and written again by `smoke` with the gate's results, so the card a
registry shows is the one the signature covers.
"""

from __future__ import annotations

import re
from pathlib import Path

from .records import Lineage

CARD = "README.md"


def merged_license(merged: Path | None) -> str | None:
    """The license named in a merged folder's model card front matter, if any."""
    card = Path(merged) / CARD if merged else None
    if card and card.is_file():
        m = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.M)
        return m.group(1) if m else None
    return None


def render(name: str, manifest: dict, license: str | None = None, library: str | None = None) -> str:
    """The card; `library` is the exporter's (Exporter.library), the Hugging Face library that loads the files."""
    lin, export = Lineage.from_json(manifest.get("inputs")), manifest["export"]
    merge, record = lin.merge, lin.training_record
    base = (lin.base or {}).get("path") or "unknown"
    license = license or merged_license(Path(lin.merged.get("path", "")) or None) or "other"
    quant = export.get("quant") or ""
    front = ["---", f"base_model: {Path(base).name}", f"license: {license}",
             *([f"library_name: {library}"] if library else []),
             f"tags: [qlora-bridge, {export['format']}" + (f", {quant}" if quant else "") + ", lora, merged]",
             "quantized_by: qlora-bridge", "---", ""]
    body = [f"# {name}", "",
            f"{Path(base).name} fine-tuned with QLoRA, merged into its "
            f"{merge.base_weights if merge else '?'} base weights ({merge.dtype if merge else '?'}) and exported as "
            f"**{export['target']} {quant}** by qlora-bridge {manifest['tool']['version']}.", ""]
    heldout = record.heldout if record else {}
    if heldout:
        body.append(f"- held-out exact match: {heldout['before']['exact_match']:.0%} before training, "
                    f"{heldout['after']['exact_match']:.0%} after ({heldout['after']['n']} prompts)")
    adapter = lin.adapter or {}
    if adapter.get("sha256"):
        body.append(f"- adapter sha256: `{adapter['sha256']}`")
    if record and record.dataset:
        body.append(f"- training data sha256: `{record.dataset['sha256']}`")
    settings = export.get("settings") or {}
    shown = {k: v for k, v in settings.items() if not isinstance(v, (dict, list)) and v is not None}
    body += ["", "## Export settings", "", *(f"- {k}: {v}" for k, v in shown.items())]
    smoke = {k: v for k, v in (manifest.get("verification") or {}).items() if k.startswith("smoke-")}
    body += ["", "## Verification", ""]
    if not smoke:
        body.append("Not smoke-tested yet: run `qlora-bridge smoke` on this folder.")
    for key, result in smoke.items():
        body.append(f"Smoke test on {result['backend']}: **{'PASSED' if result['passed'] else 'FAILED'}**")
        body.append("")
        for check, r in result["checks"].items():
            body.append(f"- {check}: {'passed' if r['passed'] else 'FAILED'} ({figures(r)})")
    body += ["", "`manifest.json` lists every file with its sha256; `model.sig`, when present, is an OpenSSF "
             "model-signing signature: `qlora-bridge verify DIR --public-key KEY.pub`."]
    return "\n".join(front + body) + "\n"


def figures(check: dict) -> str:
    """A smoke check's measured figures on one line, e.g. "kl_text=0.058, ppl_ratio=1.003"."""
    return ", ".join(f"{k}={v}" for k, v in check.items()
                     if k not in ("passed", "gate", "plugin", "details") and not isinstance(v, (dict, list)))
