"""Stages that know their inputs: train -> merge -> export, each reused when its inputs are unchanged.

A stage's key is a digest of everything that decides its output: the content digests of its input files, its
settings and the tool (or plugin) version. The key and a content digest of the output are recorded in
OUT/stages.json; a stage is reused only when its key is the same and its output is still byte for byte what was
written. Anything else runs again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from . import manifest as mf
from .files import digest_folder, sha256_file, write_json, writer_lock
from .modelcard import CARD
from .project import Project
from .records import read_training_record

if TYPE_CHECKING:
    from .host import ResolvedExport

STATE = "stages.json"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def merge_stage(base_weights: str) -> str:
    return "merge" if base_weights == "nf4" else f"merge-{base_weights}"


class Pipeline:
    def __init__(self, project: Project, registry=None, *, progress: bool = True):
        self.project, self.registry, self.progress = project, registry, progress
        self.state_path = project.out / STATE
        self.log: list[dict] = []  # what ran and what was reused, in order
        self._settled: dict[str, str] = {}  # stage -> key, for stages already run or reused in this run
        self._files: dict[Path, dict[str, str]] = {}  # folder -> its files' sha256: the base and merged model are
        # inputs of several stages, and hashing 13 GB once per stage would dominate a 7B run

    def files(self, folder: Path) -> dict[str, str]:
        folder = Path(folder).resolve()
        if folder not in self._files:
            self._files[folder] = digest_folder(folder)
        return self._files[folder]

    def folder_digest(self, folder: Path, *, fresh: bool = False) -> str:
        if fresh:  # the folder was just written
            self._files.pop(Path(folder).resolve(), None)
        return digest(self.files(folder))

    def say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def artifact_digest(self, out: Path, *, fresh: bool = False) -> str:
        """An export's own files: the manifest's verification, the model card's figures, the smoke report and the
        signature are rewritten by smoke and release on purpose, and do not make the artifact another one."""
        if fresh:
            self._files.pop(Path(out).resolve(), None)
        if not (Path(out) / mf.MANIFEST).is_file():
            return ""
        return digest({k: v for k, v in self.files(out).items()
                       if k not in (mf.MANIFEST, mf.SIGNATURE, mf.SMOKE_REPORT, CARD)})

    def _run(self, name: str, key: str, out: Path, work, output_digest=None) -> Path:
        output_digest = output_digest or self.folder_digest
        if self._settled.get(name) == key:  # asked again in this run (merge and export both need the adapter)
            return out
        with writer_lock(out, what=f"{name} stage's folder"):  # a second run of the stage refuses, or waits and
            rec = self.recorded().get(name)                    # then reuses what the first one finished
            if rec and rec["key"] == key and out.is_dir() and output_digest(out) == rec["output"]:
                self.say(f"reuse  {name}: {out} (inputs unchanged)")
                self.log.append({"stage": name, "out": str(out), "reused": True})
                self._settled[name] = key
                return out
            why = ("no earlier run" if not rec else "inputs changed" if rec["key"] != key
                   else "output changed or missing")
            self.say(f"run    {name}: {out} ({why})")
            started = time.time()
            work()
            self.record(name, {"key": key, "output": output_digest(out, fresh=True),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.log.append({"stage": name, "out": str(out), "reused": False, "seconds": round(time.time() - started, 1)})
        self._settled[name] = key
        return out

    def recorded(self) -> dict:
        """OUT/stages.json as it is now: another run of the project may have finished a stage since this one began."""
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def record(self, name: str, entry: dict | None) -> None:
        """Set (None: drop) one stage's entry in OUT/stages.json, keeping the entries other runs wrote."""
        self.project.out.mkdir(parents=True, exist_ok=True)
        with writer_lock(self.state_path, what="stage record", wait=True):  # held for milliseconds
            state = self.recorded()
            if entry is None:
                state.pop(name, None)
            else:
                state[name] = entry
            write_json(self.state_path, state)

    def forget(self, name: str) -> None:
        """Never reuse this stage's output: it runs again next time."""
        self.record(name, None)

    def export_stage(self, out: Path) -> str:
        return f"export {Path(out).relative_to(self.project.out)}"

    def adapter(self) -> Path:
        from .stages.train import TrainSettings, checked_base, train

        p, settings = self.project, TrainSettings(**self.project.train)
        settings.validate()
        base = checked_base(p.base, p.train_data, p.heldout)  # bad input named before the base is converted or hashed
        key = digest({"stage": "train", "tool": __version__, "base": self.files(base),
                      "data": sha256_file(p.train_data), "heldout": sha256_file(p.heldout) if p.heldout else None,
                      "settings": asdict(settings)})
        out = p.out / "adapter"
        return self._run("train", key, out, lambda: train(base, p.train_data, out, settings, heldout_file=p.heldout,
                                                          force=True, progress=self.progress))

    def merged(self, base_weights: str | None = None, *, gate: bool = True) -> Path:
        """gate=False keeps a merge whose equivalence check failed (its report says so), for `compare`."""
        from .stages.merge import merge

        adapter = self.adapter()
        base = read_training_record(adapter).base_path
        settings = {"base_weights": base_weights or self.project.merge.get("base_weights", "nf4"),
                    "dtype": self.project.merge.get("dtype", "float32"), **({} if gate else {"gate": False})}
        name = merge_stage(settings["base_weights"])
        key = digest({"stage": "merge", "tool": __version__, "adapter": self.folder_digest(adapter),
                      "base": self.files(base), "heldout": sha256_file(self.project.heldout)
                      if self.project.heldout else None, "settings": settings})
        out = self.project.out / ("merged" if name == "merge" else f"merged-{settings['base_weights']}")
        return self._run(name, key, out, lambda: merge(base, adapter, out, heldout_file=self.project.heldout,
                                                       force=True, progress=self.progress, **settings))

    def export(self, resolved: ResolvedExport, merged: Path | None = None, under: str = "") -> Path:
        """Export into OUT/[under/]export-TARGET-QUANT (or the project table's name): `resolved` is the table's
        export as Registry.resolve_export decided it."""
        from .stages.export import write

        merged = merged or self.merged()
        out = self.project.out / under / resolved.folder
        out.parent.mkdir(parents=True, exist_ok=True)
        plugin = resolved.plugin
        key = digest({"stage": "export", "tool": __version__, "plugin": [plugin.name, plugin.version],
                      "merged": self.folder_digest(merged), "target": resolved.target, "quant": resolved.quant,
                      "options": resolved.options})  # the exporter's options only: a serving option is no export
        return self._run(self.export_stage(out), key, out,
                         lambda: write(resolved, merged, out, force=True, progress=self.progress),
                         self.artifact_digest)
