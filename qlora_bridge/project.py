"""`qlora-bridge.toml`: one file describing a release, the defaults every command reads (flags override).

Without a file the embedded demo project is used: the embedded model, the demo data, and the export targets
that run on this machine. Paths in the file are relative to the file. A key the schema does not know is an
error naming its line, never silently ignored: a typo in `learning_rate` must not train with the default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import BridgeError
from .files import read_text
from .train_settings import TrainSettings

FILENAME = "qlora-bridge.toml"
_TRAIN_TYPES = {"steps": int, "epochs": float, "learning_rate": float, "dropout": float}
SCHEMA = {  # section -> key -> (type, allowed values or None)
    "model": {"base": (str, None), "license": (str, None)},
    "data": {"train": (str, None), "heldout": (str, None)},
    "train": {f.name: (_TRAIN_TYPES.get(f.name, type(f.default)) if f.name != "target_modules" else (str, list),
                       None) for f in fields(TrainSettings)},
    "merge": {"base_weights": (str, ("nf4", "original")), "dtype": (str, ("float32", "float16", "bfloat16"))},
    "export": {"target": (str, None), "quant": (str, None), "backend": (str, None), "options": (dict, None),
               "name": (str, None)},
    "smoke": {"suite": (str, None), "timeout": (float, None)},
    "sign": {"key": (str, None), "passphrase_env": (str, None)},
    "output": {"dir": (str, None)},
}
TABLE_ARRAYS = ("export",)  # [[export]] may repeat


@dataclass
class ExportSpec:
    """One [[export]] table. Its `options` are read by the exporter and by the serving backend: each key goes to
    whichever of the two declares it (both, for a key both read, such as threads)."""
    target: str
    quant: str | None = None
    backend: str | None = None  # None: the first backend that serves the format
    options: dict[str, str] = field(default_factory=dict)
    name: str | None = None  # folder name under the output dir (default: export-TARGET-QUANT, Registry.resolve_export)
    base_dir: Path | None = None  # the project file's folder: where relative file options start
    source: Path | None = None  # the project file that wrote the table; None: a command's flags or the demo
    index: int = 0  # which [[export]] table of the file
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line in the file; "": the table's header

    def export_options(self, exporter) -> dict[str, str]:
        """The options the exporter reads, those it declares as files (Exporter.path_options) made relative to the
        project file. A bare word naming nothing there is a keyword some file options also take ("auto"): as written."""
        here = self.base_dir or Path.cwd()
        is_path = lambda v: "/" in v or "." in v or (here / v).exists()
        return {k: str(here / v) if k in exporter.path_options and is_path(v) else v for k, v in self.options.items()
                if exporter.options is None or k in exporter.options}

    def serve_options(self, adapter) -> dict[str, str]:
        """The options the serving backend reads."""
        return {k: v for k, v in self.options.items() if adapter.options is None or k in adapter.options}

    def check(self, registry):
        """The table against the plugins loaded, before any work: its target, quant and backend, and every option
        key read by the exporter or the backend. An error names the project file and the line, not a flag the user
        never typed. A spec no file wrote is checked where its flags are read. Returns the (Exporter, PluginInfo)
        looked up, None for a spec no file wrote."""
        if self.source is None:
            return None
        found = self._checked("target", registry.exporter, self.target)
        exporter = found[0]
        if self.quant and exporter.quant_types and self.quant not in exporter.quant_types:
            raise self._refused("quant", f"export target '{self.target}' does not offer quant {self.quant!r}",
                                f"use one of {', '.join(exporter.quant_types)}")
        if self.backend:
            adapter = self._checked("backend", registry.server, self.backend)[0]
        else:
            try:
                adapter, _ = registry.server(registry.backend_for(exporter.format))
            except BridgeError:  # nothing serves the format here: release reports the export as not verified
                adapter = None
        readers = [r for r in (exporter, adapter) if r is not None]
        if any(r.options is None for r in readers):  # a plugin that declares no options reads any
            return found
        declared = {k for r in readers for k in r.options}
        for key in self.options:
            if key not in declared:
                who = f"export target '{self.target}'" + (" and its backend" if adapter else "")
                raise self._refused(f"options.{key}", f"{who} take{'' if adapter else 's'} no option {key!r}",
                                    f"they take: {', '.join(sorted(declared)) or 'none'} (`qlora-bridge plugins "
                                    "--json` describes each)", line_key="options")
        return found

    def _checked(self, key: str, lookup, name: str):
        try:
            return lookup(name)
        except BridgeError as e:
            raise self._refused(key, e.problem, e.fix) from None

    def _refused(self, key: str, problem: str, fix: str, line_key: str | None = None) -> BridgeError:
        line = self.lines.get(line_key or key) or self.lines.get("")
        return BridgeError(problem + (f" (line {line})" if line else ""), file=self.source,
                           field=f"export[{self.index}].{key}", fix=fix)


@dataclass
class Project:
    path: Path | None  # None: the embedded demo project
    base: str | None = None  # None or "embedded": the embedded model
    train_data: Path | None = None
    heldout: Path | None = None
    train: dict = field(default_factory=dict)  # TrainSettings overrides
    merge: dict = field(default_factory=dict)
    exports: list[ExportSpec] = field(default_factory=list)
    suite: Path | None = None
    smoke_timeout: float = 300.0
    sign_key: Path | None = None
    passphrase_env: str | None = None
    out: Path = Path("qlora-bridge-out")
    license: str | None = None

    def export_for(self, target: str, quant: str | None = None) -> ExportSpec:
        """The project's settings for this target (and quant), or the defaults for it."""
        for spec in self.exports:
            if spec.target == target and (quant is None or spec.quant in (None, quant)):
                return spec
        return ExportSpec(target, quant)


def line_of(text: str, section: str, key: str | None, index: int = 0) -> int | None:
    """1-based line of `key` in [section] (the index-th [[section]]), or of the header when key is None."""
    current, seen = None, -1
    for n, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?", line)
        if header:
            current = header.group(1)
            if current == section:
                seen += 1
                if key is None and seen == index:
                    return n
            continue
        if key is not None and current == section and seen == index and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return n
    return None


def _check(value, expected, allowed, where: str, path: Path, line: int | None):
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    at = f" (line {line})" if line else ""
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise BridgeError(f"{where}{at} must be {names}, not {type(value).__name__} {value!r}", file=path,
                          field=where, fix=f"write a {names} value")
    if allowed and value not in allowed:
        raise BridgeError(f"{where}{at} is {value!r}", file=path, field=where,
                          fix=f"use one of {', '.join(map(repr, allowed))}")


def load(path: Path) -> Project:
    path = Path(path)
    text = read_text(path, "project file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BridgeError(f"not valid TOML: {e}", file=path, fix="fix the syntax at the line named") from None
    for section, body in data.items():
        if section not in SCHEMA:
            raise BridgeError(f"unknown section [{section}] (line {line_of(text, section, None)})", file=path,
                              field=section, fix=f"use one of {', '.join(f'[{s}]' for s in SCHEMA)}")
        tables = body if section in TABLE_ARRAYS and isinstance(body, list) else [body]
        if section in TABLE_ARRAYS and not isinstance(body, list):
            raise BridgeError(f"[{section}] must be written [[{section}]] (line {line_of(text, section, None)})",
                              file=path, field=section, fix=f"one [[{section}]] table per target")
        for i, table in enumerate(tables):
            for key, value in table.items():
                line = line_of(text, section, key, i)
                where = f"{section}.{key}" if section not in TABLE_ARRAYS else f"{section}[{i}].{key}"
                if key not in SCHEMA[section]:
                    close = [k for k in SCHEMA[section] if k.replace("_", "") == key.replace("_", "").replace("-", "")
                             or k.startswith(key[:4])]
                    raise BridgeError(f"unknown key {where}" + (f" (line {line})" if line else ""), file=path,
                                      field=where, fix=(f"did you mean {close[0]!r}? " if close else "")
                                      + f"[{section}] takes {', '.join(SCHEMA[section])}")
                expected, allowed = SCHEMA[section][key]
                _check(value, expected, allowed, where, path, line)
            if section in TABLE_ARRAYS and "target" not in table:
                raise BridgeError(f"[[{section}]] number {i + 1} (line {line_of(text, section, None, i)}) has no "
                                  "target", file=path, field=f"{section}[{i}].target",
                                  fix='add target = "NAME" (`qlora-bridge plugins` lists the targets)')
    here = path.resolve().parent
    rel = lambda p: (here / p) if p else None
    model, d, sign, smoke = (data.get(k, {}) for k in ("model", "data", "sign", "smoke"))
    exports = [ExportSpec(e["target"], e.get("quant"), e.get("backend"),
                          {k: str(v) for k, v in e.get("options", {}).items()}, e.get("name"), here, source=path,
                          index=i, lines={k: n for k in ("", *e) if (n := line_of(text, "export", k or None, i))})
               for i, e in enumerate(data.get("export", []))]
    base = model.get("base")
    return Project(path=path, base=None if base in (None, "embedded") else str(rel(base)),
                   train_data=rel(d.get("train")), heldout=rel(d.get("heldout")), train=dict(data.get("train", {})),
                   merge=dict(data.get("merge", {})), exports=exports, suite=rel(smoke.get("suite")),
                   smoke_timeout=float(smoke.get("timeout", 300)), sign_key=rel(sign.get("key")),
                   passphrase_env=sign.get("passphrase_env"), out=rel(data.get("output", {}).get("dir")) or
                   here / "qlora-bridge-out", license=model.get("license"))


def demo_project() -> Project:
    """The embedded demo: embedded model, demo data, and the targets this machine can export and serve quickly."""
    from . import demo

    return Project(path=None, train_data=demo.train_file(), heldout=demo.heldout_file(),
                   train=dict(demo.TRAIN_OVERRIDES), exports=[ExportSpec(*e) for e in demo.exports()],
                   out=Path("qlora-bridge-out"))


def find(path: Path | None = None) -> Project:
    """The project file given, else qlora-bridge.toml in the working directory, else the demo project."""
    if path is not None:
        if not Path(path).is_file():
            raise BridgeError("project file not found", file=path, field="--project",
                              fix="give the path of a qlora-bridge.toml, or run `qlora-bridge init`")
        return load(Path(path))
    return load(Path(FILENAME)) if Path(FILENAME).is_file() else demo_project()


STARTER = '''# qlora-bridge.toml: one release, from fine-tune to signed, smoke-tested artifacts.
# Every command reads its defaults from here; command-line flags override. Paths are relative to this file.

[model]
base = "embedded"                 # a local Hugging Face model folder, or "embedded" (SmolLM2-135M-Instruct)
# license = "apache-2.0"          # carried into the model cards (default: the base model card's license)

[data]
train = "data/train.jsonl"        # chat {"messages": [...]}, {"prompt", "completion"} or {"text"} records
heldout = "data/heldout.jsonl"    # scored before/after training, and the smoke test's retention check

[train]                           # QLoRA: NF4 + double quantization, LoRA on every linear layer
steps = 200
learning_rate = 2e-4
batch_size = 8
rank = 16
alpha = 32
max_seq_len = 512

[merge]
base_weights = "nf4"              # add the adapter to the NF4-rounded weights it was trained against (exact);
                                  # `qlora-bridge compare` measures nf4 vs original on every target
dtype = "float32"

[[export]]
target = "gguf"
quant = "Q4_K_M"
backend = "llamacpp"

[[export]]
target = "awq"                    # for vLLM; needs a GPU or an AVX-512 CPU to serve
quant = "int4"
backend = "vllm"
# options = { group_size = 32 }   # exporter settings: `qlora-bridge plugins` lists each target's

[smoke]
# suite = "suite.yaml"            # golden prompts; default: the held-out answers the merged model gets right

[sign]
# key = "keys/release.pem"        # `qlora-bridge keygen --out keys/release`; unsigned releases say so

[output]
dir = "qlora-bridge-out"
'''
