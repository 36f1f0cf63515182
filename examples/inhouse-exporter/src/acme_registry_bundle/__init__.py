"""ACME's registry bundle: the merged model as one tar file plus registry.json, as ACME's registry ingests it.

A model of an in-house exporter: it uses only qlora_bridge.api, registers through the `qlora_bridge` entry-point
group, declares on its registration everything qlora-bridge needs to know about its target (quant types and the
smoke gate's bounds for each, bits per weight for the release report, the model card's library, its options and
which of them are files, its memory for `plan`), and leaves digests, the manifest and signing to qlora-bridge.
"""

import hashlib
import json
import tarfile
from pathlib import Path

from qlora_bridge.api import (Bounds, BridgeError, CheckFailed, Exporter, ExportRequest, ExportResult, Lineage,
                              ModelShape, Need, hookimpl)

PLUGIN_API = 5  # the qlora-bridge plugin API this plugin was written for
__version__ = "1.2.0"
COMPRESSIONS = ("none", "gz")
# what the smoke gate allows a served bundle: it holds the merged files byte for byte, so a float32 copy's bounds
LOSSLESS = Bounds(kl_answers=1e-4, kl_text=1e-4, ppl_ratio=1.001, task_ratio=1.0,
                  reason="lossless: the bundle holds the merged files byte for byte")
BITS = {"float32": 32, "float16": 16, "bfloat16": 16}  # the merged folder's dtype, kept as it is
OPTIONS = {"team": "the owning team (required)",
           "owners": "a file listing the team's members, put in the bundle as OWNERS (optional)"}


def export(req: ExportRequest) -> ExportResult:
    team = req.options.get("team")
    if not team:
        raise BridgeError("ACME's registry needs an owning team", field="--option team",
                          fix="pass --option team=YOUR-TEAM")
    mode = "w:gz" if req.quant == "gz" else "w"
    bundle = req.out / ("model.tar.gz" if req.quant == "gz" else "model.tar")
    owners = req.options.get("owners")
    if owners and not Path(owners).is_file():
        raise BridgeError("owners file not found", file=owners, field="--option owners", fix="give a text file")
    files = sorted(p for p in req.merged.iterdir() if p.is_file())
    with tarfile.open(bundle, mode) as tar:
        for p in files:
            tar.add(p, arcname=p.name)
        if owners:
            tar.add(owners, arcname="OWNERS")
    with tarfile.open(bundle) as tar:  # read back before anyone relies on it
        if sorted(tar.getnames()) != sorted([p.name for p in files] + (["OWNERS"] if owners else [])):
            raise CheckFailed("the bundle does not hold every merged file", file=bundle, fix="check the disk")
    lineage = Lineage.from_json(req.lineage)
    dtype = lineage.merge.dtype if lineage.merge else None
    registry = {"team": team, "bundle": bundle.name,
                "bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                "base_weights": lineage.merge.base_weights if lineage.merge else None, "dtype": dtype,
                "adapter_sha256": (lineage.adapter or {}).get("sha256")}
    (req.out / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
    return ExportResult(settings={"team": team, "compression": req.quant, "dtype": dtype},
                        checks={"bundle_members": len(files)})


def memory(shape: ModelShape, quant: str | None, gpu: bool) -> Need:
    """For `qlora-bridge plan`: tarfile streams each member in small blocks; the bundle holds the merged files."""
    weights = shape.params * shape.dtype_bytes
    return Need(host={"tarfile buffers": 16 * 2**20}, disk={"bundle": weights}, output=weights)


@hookimpl
def register_exporters(register):
    register(Exporter(target="acme-registry", export=export, format="tar-bundle", quant_types=COMPRESSIONS,
                      bounds={c: LOSSLESS for c in COMPRESSIONS}, options=OPTIONS, path_options=("owners",),
                      library="acme-registry", bits_per_weight=lambda export: BITS.get(export["settings"]["dtype"]),
                      memory=memory, description="ACME model-registry bundle (tar + registry.json)"))
