"""`qlora-bridge export`: run a registered exporter on a merged folder, then write and sign the manifest."""

from __future__ import annotations

import time
from pathlib import Path

from .. import manifest as mf
from ..api import ExportRequest, ExportResult
from ..errors import EXIT_INTERNAL, BridgeError
from ..files import output_folder
from ..host import Registry, ResolvedExport
from ..modelcard import CARD, render
from ..records import lineage
from ..signing import sign


class PluginFailed(BridgeError):
    """A plugin raised something that is not a user error: name the plugin, keep the traceback's gist."""

    exit_code = EXIT_INTERNAL


def export_log(out: Path) -> Path:
    """Where an export's engines write their own console output: beside the folder, as the servers' logs are."""
    return Path(out).with_name(f"{Path(out).name}.export.log")


def export(registry: Registry, target: str, merged: Path, out: Path, *, quant: str | None = None,
           options: dict[str, str] | None = None, **how) -> dict:
    """Export `merged` to `target` into `out`: the library's one call (resolve, then write).

        export(registry, "gguf", Path("merged"), Path("out/gguf"), quant="Q4_K_M", sign_key=Path("release.pem"))
    """
    return write(registry.resolve_export(target, quant=quant, options=options), merged, out, **how)


def write(resolved: ResolvedExport, merged: Path, out: Path, *, sign_key: Path | None = None,
          passphrase: bytes | None = None, force: bool = False, progress: bool = True,
          license: str | None = None) -> dict:
    """Run a resolved export into `out`, then write (and sign) its manifest."""
    exporter, plugin, target, quant, options = (resolved.exporter, resolved.plugin, resolved.target, resolved.quant,
                                                resolved.options)
    merged = Path(merged)
    if not (merged / "config.json").is_file():
        raise BridgeError("not a merged model folder (no config.json)", file=merged,
                          fix="pass the folder written by `qlora-bridge merge`")
    if sign_key is not None and not Path(sign_key).is_file():
        raise BridgeError("private key not found", file=sign_key, fix="create one with `qlora-bridge keygen`")
    inputs = lineage(merged).to_json()  # what the plugin and the manifest get: plain JSON
    started = time.time()
    log = export_log(out)
    with output_folder(out, force=force, what="export folder", marker=mf.MANIFEST) as tmp:
        log.unlink(missing_ok=True)
        request = ExportRequest(merged=merged, out=tmp, quant=quant, options=dict(options or {}),
                                lineage=inputs, progress=progress, log=log)
        try:
            result = exporter.export(request)
        except BridgeError:
            raise
        except Exception as e:
            raise PluginFailed(f"exporter '{target}' of plugin '{plugin.name}' ({plugin.origin}) failed: "
                               f"{type(e).__name__}: {e}", fix="report this to the plugin's authors; "
                               "nothing was written") from e
        if not isinstance(result, ExportResult):
            raise PluginFailed(f"exporter '{target}' of plugin '{plugin.name}' returned {type(result).__name__}, "
                               "not an ExportResult", fix="report this to the plugin's authors")
        if not any(tmp.iterdir()):
            raise PluginFailed(f"exporter '{target}' of plugin '{plugin.name}' wrote no files",
                               fix="report this to the plugin's authors")
        settings = {"quant": quant, "options": dict(options or {}), **result.settings,
                    "seconds": round(time.time() - started, 2)}
        manifest = mf.build(tmp, target=target, fmt=exporter.format, quant=quant,
                            plugin={"name": plugin.name, "version": plugin.version, "source": plugin.source,
                                    "origin": plugin.origin},
                            settings=settings, checks=result.checks, inputs=inputs)
        if not (tmp / CARD).exists():  # an exporter may write its own card
            (tmp / CARD).write_text(render(out.name, manifest, license, exporter.library))
            manifest["outputs"] = sorted([*manifest["outputs"], mf.output_entry(tmp, CARD)], key=lambda e: e["path"])
        mf.write(tmp, manifest)
        if sign_key is not None:
            sign(tmp, Path(sign_key), passphrase)
    return manifest
