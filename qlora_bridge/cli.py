"""The `qlora-bridge` command: one verb per stage, a thin layer over the library.

Exit codes: 0 success; 1 internal error (a bug: traceback shown); 2 bad input (the message names the file, the
field and the fix); 3 a check failed (the work ran but its result must not be trusted); 130 interrupted.
Every verb takes --json and then prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .errors import EXIT_CHECK_FAILED, EXIT_OK, BridgeError
from .files import quiet_libraries
from .records import MergeReport, read_merge_report, read_training_record


@dataclass
class Outcome:
    data: dict
    text: str
    exit_code: int = EXIT_OK
    quiet: bool = False  # the command already printed what it had to say


def written_report(project, name: str) -> str:
    """A report the command wrote into the project's output folder, and where it is."""
    return (project.out / f"{name}.md").read_text() + f"\n(report: {project.out / name}.md and .json)"


def project_of(a):
    """The release this command works on: --project, ./qlora-bridge.toml, or the embedded demo project."""
    from .project import find

    return find(Path(a.project) if getattr(a, "project", None) else None)


# ---------------------------------------------------------------------------------------------------- init, release
def add_init(sub) -> None:
    p = sub.add_parser("init", help="write a commented starter qlora-bridge.toml",
                       description="Write qlora-bridge.toml, the project file every command reads its defaults from "
                       "(base model, data, training, merge, export targets, serving, smoke suite, signing key).")
    p.add_argument("--out", default="qlora-bridge.toml", help="file to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.set_defaults(func=run_init)


def run_init(a) -> Outcome:
    from .project import STARTER

    path = Path(a.out)
    if path.exists() and not a.force:
        raise BridgeError("the project file already exists", file=path, fix="edit it, or pass --force to replace it")
    path.write_text(STARTER)
    return Outcome({"project": str(path)}, f"wrote {path}: edit [model], [data] and [[export]], then run "
                   "`qlora-bridge release`")


def add_release(sub) -> None:
    p = sub.add_parser("release", help="train, merge, export every target, smoke-test each on its server, sign, "
                       "report", description="Run the project's whole release: stages whose inputs are unchanged are "
                       "reused; each export is served on its backend and must pass the smoke gate before it is "
                       "signed; failures are renamed NAME.FAILED. Writes OUT/release-report.md and .json. Exit 3 if "
                       "any artifact failed.")
    add_passphrase_option(p)
    add_plugin_option(p)
    p.set_defaults(func=run_release)


def run_release(a) -> Outcome:
    from .host import load_plugins
    from .release import REPORT, release

    project = project_of(a)
    report = release(project, load_plugins(a.plugin),
                     passphrase=passphrase_from(a.passphrase_env or project.passphrase_env))
    return Outcome(report, written_report(project, REPORT), EXIT_OK if report["passed"] else EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------------- compare
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="nf4 vs original base weights: both merges, exported to every target, held "
                       "against the trained model", description="Build both merges of the project's adapter (nf4 "
                       "and original base weights), export each to the project's targets, and report which stays "
                       "closer to the trained 4-bit + adapter model on the held-out set (KL, answers kept, exact "
                       "match). Works on the project's own stages. Writes OUT/compare-report.md and .json.")
    add_plugin_option(p)
    p.set_defaults(func=run_compare)


def run_compare(a) -> Outcome:
    from .compare import REPORT, compare
    from .host import load_plugins

    project = project_of(a)
    return Outcome(compare(project, load_plugins(a.plugin)), written_report(project, REPORT))


# ---------------------------------------------------------------------------------------------------- plan
def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="will it fit? peak GPU memory, host memory and disk of every stage",
                       description="Predict the peak GPU memory, host memory and disk of training, the merge, each "
                       "export target and serving it, from a model folder or a bare config.json, and say for each "
                       "whether it fits the hardware given (default: this machine) and, where not, which settings "
                       "would make it fit. Takes train's own flags. Exit 3 if a stage does not fit.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", help="model folder (default: the project's base)")
    src.add_argument("--config", help="a config.json alone: no weights needed")
    p.add_argument("--gpu", metavar="SIZE", help="one GPU of this memory, e.g. 24GB (GB read as GiB, as sold)")
    p.add_argument("--gpus", metavar="NxSIZE", help="several GPUs, e.g. 2x80GB")
    p.add_argument("--ram", metavar="SIZE", help="host memory (default: this machine's)")
    p.add_argument("--disk", metavar="SIZE", help="free disk (default: free space where the project writes)")
    p.add_argument("--target", action="append", default=[], metavar="TARGET[:QUANT]",
                   help="export target to plan, repeatable (default: the project's)")
    p.add_argument("--context", type=int, default=4096, help="serving context length in tokens (default: 4096)")
    p.add_argument("--concurrency", type=int, default=1, help="requests served at once (default: 1)")
    add_train_settings(p)
    add_plugin_option(p)
    p.set_defaults(func=run_plan)


def run_plan(a) -> Outcome:
    from .host import load_plugins
    from .plan import hardware, plan, plan_shape, render
    from .project import ExportSpec

    project = project_of(a)
    settings, _ = train_settings(a, project, own_data=False)
    exports = ([ExportSpec(t.partition(":")[0], t.partition(":")[2] or None) for t in a.target] if a.target
               else project.exports)
    hw = hardware(gpu=a.gpu, gpus=a.gpus, ram=a.ram, disk=a.disk, where=project.out)
    report = plan(plan_shape(project, a.base, a.config), settings, hw, load_plugins(a.plugin), exports,
                  merge_dtype=project.merge.get("dtype", "float32"), context=a.context, concurrency=a.concurrency)
    return Outcome(report, render(report), EXIT_OK if report["fits"] else EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="QLoRA fine-tune: 4-bit NF4 base + LoRA adapters",
                       description="Fine-tune LoRA adapters on a 4-bit NF4 (double-quantized) base. With no "
                       "arguments: the embedded SmolLM2-135M-Instruct on the demo dataset, reporting held-out "
                       "exact match before and after.")
    p.add_argument("--base", help="base Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training JSONL: chat ('messages'), instruction ('prompt'/'completion') or "
                   "'text' records (default: the demo dataset, with the demo's training settings)")
    p.add_argument("--heldout", help="held-out JSONL (chat or instruction) whose expected answers are scored by "
                   "exact match before and after training (default with the demo dataset: the demo held-out set)")
    p.add_argument("--out", help="adapter folder to write (default: OUT/adapter of the project, reused when its "
                   "inputs are unchanged)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (train again)")
    add_train_settings(p)
    p.set_defaults(func=run_train)


def add_train_settings(p) -> None:
    """The flags that make TrainSettings: `train` runs with them, `plan` predicts with them."""
    g = p.add_argument_group("quantization")
    g.add_argument("--quant", choices=["nf4", "fp4", "none"], help="4-bit type of the frozen base; 'none' trains "
                   "a plain LoRA on the unquantized base, the baseline for QLoRA's memory/quality trade-off "
                   "(default: nf4)")
    g.add_argument("--no-double-quant", action="store_true", help="do not quantize the block scales again")
    g.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the 4-bit layers' matmuls (default: float32)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="LoRA rank r (default: 16)")
    g.add_argument("--alpha", type=int, help="LoRA alpha; the update is scaled by alpha/r (default: 32)")
    g.add_argument("--dropout", type=float, help="LoRA dropout (default: 0.05)")
    g.add_argument("--target-modules", help="comma-separated module names, or 'all-linear' (default: all-linear)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help="optimizer steps; overrides --epochs (demo default: 30)")
    g.add_argument("--epochs", type=float, help="passes over the data (default: 1)")
    g.add_argument("--lr", type=float, dest="learning_rate", help="peak learning rate (default: 2e-4; demo 1e-3)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="learning-rate schedule "
                   "(default: cosine)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 0)")
    g.add_argument("--batch-size", type=int, help="records per micro-batch (default: 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--max-seq-len", type=int, help="longest record in tokens; longer ones are refused unless "
                   "--truncate (default: 512)")
    g.add_argument("--truncate", action="store_true", default=None, help="cut records longer than --max-seq-len "
                   "instead of refusing them; records left without answer tokens are dropped and reported")
    g.add_argument("--seed", type=int, help="seed for initialisation, shuffling and dropout (default: 0)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: less memory, more time")
    g.add_argument("--optimizer", choices=["auto", "adamw", "adamw8bit", "paged_adamw8bit"],
                   help="auto = paged 8-bit AdamW on a GPU, torch AdamW on CPU (default: auto)")
    g = p.add_argument_group("parallel")
    g.add_argument("--processes", type=int, help="data-parallel processes on this machine: one per GPU, or CPU "
                   "processes (gloo); each takes --batch-size records of every step (default: 1)")
    g.add_argument("--strategy", help="ddp (each process holds the whole 4-bit model) or fsdp (FSDP-QLoRA: the base "
                   "sharded across GPUs) (default: ddp)")
    g.add_argument("--launcher", help="torchrun or accelerate (`accelerate launch`, GPUs only) (default: torchrun)")


def train_settings(a, project, own_data: bool):
    """The project's [train] settings (unless the command trains on data of its own), then the flags."""
    from .train_settings import TrainSettings

    values = {} if own_data else dict(project.train)
    for name in TrainSettings.__dataclass_fields__:
        if getattr(a, name, None) is not None:
            values[name] = getattr(a, name)
    if a.no_double_quant:
        values["double_quant"] = False
    if isinstance(values.get("target_modules"), str) and values["target_modules"] != "all-linear":
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    settings = TrainSettings(**values)
    settings.validate()
    return settings, values


def run_train(a) -> Outcome:
    from .pipeline import Pipeline
    from .stages.train import checked_base, train

    project = project_of(a)
    settings, values = train_settings(a, project, own_data=a.data is not None)
    data = Path(a.data) if a.data else project.train_data
    heldout_path = a.heldout or (project.heldout if a.data is None else None)
    base = a.base or project.base
    if a.out is None:  # the project's stage, as the flags amend it: reused when its inputs are unchanged
        pipe = Pipeline(replace(project, base=base, train_data=data, heldout=heldout_path, train=values))
        if a.force:
            pipe.forget("train")
        adapter = pipe.adapter()
    else:
        adapter = train(checked_base(base, data, heldout_path), data, Path(a.out), settings, heldout_file=heldout_path,
                        force=a.force).adapter
    rec = read_training_record(adapter)
    lines = [f"adapter: {adapter}",
             f"steps: {rec.steps}  loss {rec.loss_curve[0]:.3f} -> {rec.loss_curve[-1]:.3f}  "
             f"train {rec.train_seconds:.0f} s  wall {rec.wall_seconds:.0f} s  "
             f"peak RSS {rec.peak_rss_mib:.0f} MiB  ({settings.quant} base)"]
    cut, dropped = rec.dataset["truncated_lines"], rec.dataset["dropped_lines"]
    if cut:
        lines.append(f"truncated to {settings.max_seq_len} tokens: lines {cut}; dropped (no answer token left): "
                     f"{dropped or 'none'}")
    for w in rec.dataset.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if rec.heldout:
        before, after = rec.heldout["before"], rec.heldout["after"]
        lines.append(f"held-out exact match: before {before['exact_match']:.0%} -> after {after['exact_match']:.0%} "
                     f"({after['n']} prompts from {heldout_path})")
        for b, f in list(zip(before["answers"], after["answers"]))[:3]:
            lines += [f"  expected: {b['expected']}", f"    before: {b['got'].strip()[:100]!r}",
                      f"    after:  {f['got'].strip()[:100]!r}"]
    data_out = {"adapter": str(adapter), "record": rec.to_json()}
    return Outcome(data_out, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- merge
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="exact, streaming dequantize-and-merge of an adapter into its base",
                       description="Add the LoRA adapter to the weights it was trained against (the NF4-rounded "
                       "base, rebuilt and proven by fingerprint) in float32, streaming tensor by tensor, and check "
                       "the merged model's logits against the 4-bit base + adapter.")
    p.add_argument("--base", help="base model folder (default: the base recorded in the adapter's training "
                   "record if it exists, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder from `train` (default: the project's, trained first when "
                   "missing or out of date)")
    p.add_argument("--out", help="merged model folder to write (default: OUT/merged of the project)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (merge again)")
    p.add_argument("--base-weights", choices=["nf4", "original"],
                   help="nf4: add the delta to dequant(nf4(W)), the weights the adapter was trained against "
                   "(exact); original: add it to W (what most tools do; a different model) (default: the project's, "
                   "else nf4)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="stored dtype; the report says per layer how much of the delta float16 and bfloat16 would "
                   "keep, and a warning is printed when the chosen one loses a meaningful share (default: float32)")
    p.add_argument("--check", choices=["auto", "full", "layer", "none"], default="auto",
                   help="equivalence check: full = merged logits vs the 4-bit base + adapter on a few hundred "
                   "tokens; layer = per-layer sampled activations (for models too large to load twice); auto "
                   "picks full when it fits in memory (default: %(default)s)")
    p.add_argument("--heldout", help="held-out JSONL to answer with the merged model, beside the 4-bit + adapter "
                   "answers from training (default: the held-out file in the training record)")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out comparison")
    p.add_argument("--ignore-base-digests", action="store_true",
                   help="accept a base whose files differ from those recorded in training (for a re-saved base; "
                   "nf4 mode still proves the weights by fingerprint)")
    p.add_argument("--inexact-nf4", action="store_true",
                   help="for an adapter trained on a GPU, merged where there is none: rebuild NF4 on the CPU "
                   "without proving it (bitsandbytes' CUDA and CPU kernels round ~1e-3 apart); the report says so")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="output shard size in GiB (default: 2)")
    p.add_argument("--threads", type=int, help="torch threads for the arithmetic (default: all cores)")
    p.set_defaults(func=run_merge)


def run_merge(a) -> Outcome:
    from .pipeline import Pipeline, merge_stage
    from .stages.merge import merge, recorded_inputs

    project = project_of(a)
    a.base_weights = a.base_weights or project.merge.get("base_weights", "nf4")
    a.dtype = a.dtype or project.merge.get("dtype", "float32")
    if a.adapter is None and a.out is None and a.base is None and a.check == "auto" and not a.heldout \
            and not a.no_heldout:  # the project's stages: train when needed, reuse what is unchanged
        pipe = Pipeline(replace(project, merge={**project.merge, "base_weights": a.base_weights, "dtype": a.dtype}))
        if a.force:
            pipe.forget(merge_stage(a.base_weights))
        out = pipe.merged(a.base_weights)
        return merge_outcome(out, read_merge_report(out))
    a.adapter = a.adapter or str(project.out / "adapter")
    a.out = a.out or str(project.out / "merged")
    base, heldout = recorded_inputs(Path(a.adapter), a.base, a.heldout, use_heldout=not a.no_heldout)
    report = merge(base, Path(a.adapter), Path(a.out), base_weights=a.base_weights, dtype=a.dtype, check=a.check,
                   heldout_file=heldout, force=a.force,
                   ignore_base_digests=a.ignore_base_digests, inexact_nf4=a.inexact_nf4,
                   max_shard_bytes=int(a.max_shard_size * 2**30),
                   threads=a.threads)
    return merge_outcome(Path(a.out), report)


def merge_outcome(out: Path, report: MergeReport) -> Outcome:
    from .stages.merge import KEPT_WARNING

    warnings_ = list(report.warnings)
    if report.delta_kept_overall < KEPT_WARNING:
        warnings_.append(f"{report.dtype} keeps only {report.delta_kept_overall:.1%} of the LoRA delta; "
                         "use --dtype float32 or float16")
    c = report.check
    checked = (f"check ({c['method']}): relative logits error {c['rel_error']:.2e}"
               + (f" (limit {c['limit']:.0e})" if c.get("limit") else "")
               + (f", adapter effect {c['adapter_effect']:.3f}" if "adapter_effect" in c else "")
               if c.get("rel_error") is not None else "unchecked (--check none): nothing proves it equal to the "
               "trained model, so exports of it are measured against the 4-bit base + adapter")
    lines = [f"merged: {out}  ({report.base_weights} base weights, {report.dtype})", checked,
             f"delta kept: {report.delta_kept_overall:.4f}   wall {report.wall_seconds:.1f} s   "
             f"peak RSS {report.peak_rss_mib:.0f} MiB   read {report.bytes_read / 1e6:.0f} MB, "
             f"wrote {report.bytes_written / 1e6:.0f} MB"]
    if h := report.heldout:
        lines.append(f"held-out: merged model {h['exact_match']:.0%} exact match; agrees with the 4-bit + adapter "
                     f"model on {h['agree_with_adapter']}/{h['compared']} answers")
        for row in h["answers"][:3]:
            lines += [f"  expected:        {row['expected']}", f"  4-bit + adapter: {str(row['adapter_got']).strip()}",
                      f"  merged:          {row['got'].strip()}"]
    for w in warnings_:
        print(f"warning: {w}", file=sys.stderr)
    return Outcome({"out": str(out), "report": report.to_json(), "warnings": warnings_}, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- plugins
def add_plugin_option(p) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="also load this plugin: a module name or a .py path (repeatable; QLORA_BRIDGE_PLUGINS "
                   "works the same, separated by ':')")


def add_plugins(sub) -> None:
    p = sub.add_parser("plugins", help="list every plugin: name, kind, targets or backends, version, origin",
                       description="List the plugins found: the built-ins, installed packages (entry-point group "
                       "'qlora_bridge') and local modules. Exits 3 if a plugin is broken or two claim one name.")
    add_plugin_option(p)
    p.set_defaults(func=run_plugins)


def run_plugins(a) -> Outcome:
    from .host import load_plugins

    reg = load_plugins(a.plugin)
    rows = [{"name": p.name, "source": p.source, "origin": p.origin, "version": p.version, "provides": p.provides,
             "error": p.error} for p in reg.plugins.values()]
    lines = [f"{'plugin':<22}{'version':<10}{'source':<13}provides"]
    for r in rows:
        lines.append(f"{r['name']:<22}{r['version']:<10}{r['source']:<13}{', '.join(r['provides']) or '-'}")
        lines.append(f"{'':<22}from {r['origin']}")
    options = {f"{kind} {key}": item.options for kind, hook in (("exporter", "register_exporters"),
                                                                 ("server", "register_servers"))
               for key, (item, _) in reg.items[hook].items() if item.options is not None}
    lines += [f"{name} takes --option {', '.join(opts) or '(none)'}" for name, opts in options.items()]
    lines += [f"not installed: {m}" for m in reg.missing]
    lines += [f"problem: {p}" for p in reg.problems]
    return Outcome({"plugins": rows, "options": options, "not_installed": reg.missing, "problems": reg.problems},
                   "\n".join(lines),
                   EXIT_CHECK_FAILED if reg.problems else EXIT_OK)


# ---------------------------------------------------------------------------------------------------- export
def passphrase_from(env_var: str | None) -> bytes | None:
    import os

    if not env_var:
        return None
    if env_var not in os.environ:
        raise BridgeError(f"environment variable {env_var} is not set", field="--passphrase-env",
                          fix=f"export {env_var}=... before running, or drop --passphrase-env")
    return os.environ[env_var].encode()


def add_passphrase_option(p) -> None:
    p.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding the key's passphrase")


def add_export(sub) -> None:
    p = sub.add_parser("export", help="re-quantize or re-save a merged model through an exporter plugin",
                       description="Run the exporter registered for --target on a merged model folder, write "
                       "manifest.json (inputs, settings, environment, every output's sha256) and sign the folder "
                       "when given a key. See `qlora-bridge plugins` for the targets.")
    p.add_argument("--target", required=True, help="export target, e.g. safetensors")
    p.add_argument("--quant", help="quantization or dtype the target offers (default: the target's first)")
    p.add_argument("--merged", help="merged model folder (default: the project's, trained and merged first when "
                   "missing or out of date)")
    p.add_argument("--out", help="export folder to write (default: OUT/export-TARGET-QUANT of the project)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="exporter-specific setting (repeatable), e.g. max_shard_size=4")
    p.add_argument("--sign-key", help="private key (.pem) to sign the export folder with")
    add_passphrase_option(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_plugin_option(p)
    p.set_defaults(func=run_export)


def run_export(a) -> Outcome:
    from .host import load_plugins
    from .pipeline import Pipeline
    from .stages.export import export_log, write

    project = project_of(a)
    reg = load_plugins(a.plugin)
    # flags over the project's table over the target's defaults, checked before a merge that may take minutes
    resolved = reg.resolve_export(a.target, quant=a.quant, options=options_from(a.option),
                                  spec=project.export_for(a.target, a.quant))
    out = Path(a.out) if a.out else project.out / resolved.folder
    merged = Path(a.merged) if a.merged else Pipeline(project, reg).merged()
    sign_key = a.sign_key or project.sign_key
    manifest = write(resolved, merged, out, sign_key=Path(sign_key) if sign_key else None,
                     passphrase=passphrase_from(a.passphrase_env or project.passphrase_env), force=a.force,
                     license=project.license)
    size = sum(o["size"] for o in manifest["outputs"])
    summary = resolved.exporter.summary(manifest["export"]) if resolved.exporter.summary else []
    text = (f"exported: {out}  ({a.target} {resolved.quant or ''}, {len(manifest['outputs'])} files, "
            f"{size / 1e6:.1f} MB, plugin {manifest['plugin']['name']} {manifest['plugin']['version']})"
            + "".join(f"\n  {line}" for line in summary)
            + ("\nsigned: " + str(out / "model.sig") if sign_key else "\nnot signed (no --sign-key)"))
    log = export_log(out)
    if log.is_file() and log.stat().st_size:
        text += f"\nthe engines' own output: {log}"
    return Outcome({"out": str(out), "signed": bool(sign_key), "manifest": manifest}, text)


# ---------------------------------------------------------------------------------------------------- serve, smoke
def options_from(pairs: list[str]) -> dict[str, str]:
    options = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BridgeError(f"--option {item!r} is not KEY=VALUE", field="--option", fix="e.g. --option key=value")
        options[key.strip()] = value.strip()
    return options


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an export on 127.0.0.1 through a serving adapter until Ctrl-C",
                       description="Start the backend's OpenAI-compatible server on a free port of 127.0.0.1, wait "
                       "until it is ready, stream its log to DIR's sibling DIR.BACKEND.log, and stop it and "
                       "everything it started on exit, Ctrl-C or error.")
    add_served_export_options(p)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default: 300)")
    p.set_defaults(func=run_serve)


def add_served_export_options(p) -> None:
    p.add_argument("dir", help="export folder")
    p.add_argument("--backend", help="serving backend (default: the first that serves the export's format)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend setting (repeatable)")
    add_plugin_option(p)


def chosen_backend(a):
    """The plugin registry, the export folder, and the backend asked for or the first that serves its format."""
    from .host import load_plugins
    from .stages.serve import artifact_format

    reg = load_plugins(a.plugin)
    folder = Path(a.dir)
    return reg, folder, a.backend or reg.backend_for(artifact_format(folder, reg))


def run_serve(a) -> Outcome:
    import signal
    import threading

    from . import manifest as mf
    from .stages.serve import ServerFailed, failure, serving
    from .stages.smoke import check_unchanged

    reg, folder, backend = chosen_backend(a)
    if (folder / mf.MANIFEST).is_file():  # a folder made elsewhere has no digests to hold it to
        check_unchanged(folder, mf.read(folder))
    log = folder.parent / f"{folder.name}.{backend}.log"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serving(reg, backend, folder, log=log, options=options_from(a.option), timeout=a.timeout) as server:
        ready = {"url": server.base_url, "backend": backend, "log": str(log), "pid": server.pid,
                 "seconds_to_ready": server.seconds_to_ready}
        try:  # from the ready line on: a Ctrl-C that comes before the loop is a stop too
            print(json.dumps(ready) if a.json else f"serving {folder} at {server.base_url}/v1 ({backend}; log "
                  f"{log}); Ctrl-C stops it", flush=True)
            while not stop.wait(0.5):
                if server.process.poll() is not None:  # died under its users: say so, exit 3
                    raise ServerFailed(failure(server, hang_wait=0), file=folder, fix="read the log above")
        except KeyboardInterrupt:
            pass
    return Outcome({**ready, "stopped": True}, "stopped", quiet=True)


def add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="serve an export and run the smoke-test gate",
                       description="Serve DIR, run every registered smoke check (answers, tokenization parity, "
                       "chat template, golden prompts, KL divergence from the trained model on its held-out answers "
                       "and a long text, held-out task score with a paired test, speed), write the "
                       "results into the manifest's verification section and smoke-report.md, re-sign when given "
                       "a key, and exit 3 when a gating check fails.")
    add_served_export_options(p)
    p.add_argument("--suite", help="golden prompts: JSONL or YAML with prompt, expected, match "
                   "(exact|contains|regex|json) (default: the held-out examples from the export's lineage)")
    p.add_argument("--merged", help="merged model folder to compare with (default: the one in the manifest)")
    p.add_argument("--sign-key", help="private key to re-sign the folder with after adding the results")
    add_passphrase_option(p)
    p.set_defaults(func=run_smoke)


def run_smoke(a) -> Outcome:
    from .modelcard import figures
    from .stages.smoke import smoke

    project = project_of(a)
    reg, folder, backend = chosen_backend(a)
    suite = a.suite or project.suite
    result = smoke(reg, folder, backend, suite_file=Path(suite) if suite else None,
                   merged=Path(a.merged) if a.merged else None, sign_key=Path(a.sign_key) if a.sign_key else None,
                   passphrase=passphrase_from(a.passphrase_env), options=options_from(a.option),
                   timeout=project.smoke_timeout, license=project.license)
    lines = [f"smoke {folder} on {backend}: {'PASSED' if result['passed'] else 'FAILED'} "
             f"(bounds {result['bounds_source']})", f"  against {result['reference']}"]
    if result["server_failure"]:
        lines.append("  " + result["server_failure"].replace("\n", "\n    "))
    for name, r in result["checks"].items():
        gating = "" if r["gate"] else " (not gating)"
        lines.append(f"  {'ok  ' if r['passed'] else 'FAIL'} {name}{gating}: {figures(r)}")
    lines.append(f"signature: {result['signature']}")
    return Outcome({"dir": str(folder), **result}, "\n".join(lines), EXIT_OK if result["passed"] else EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------------- signing
def add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="make an EC P-256 signing key pair",
                       description="Write PREFIX.pem (private key, file mode 0600) and PREFIX.pub (public key), "
                       "the key type the OpenSSF model_signing tool accepts.")
    p.add_argument("--out", default="qlora-bridge-keys/release", help="path prefix (default: %(default)s)")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase in VAR")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=run_keygen)


def run_keygen(a) -> Outcome:
    from .signing import keygen

    private, public = keygen(Path(a.out), passphrase_from(a.passphrase_env), a.force)
    return Outcome({"private_key": str(private), "public_key": str(public)},
                   f"private key: {private} (mode 0600; keep it secret)\npublic key:  {public} (give it to verifiers)")


def add_sign(sub) -> None:
    p = sub.add_parser("sign", help="sign an export folder (again), e.g. after smoke results were added",
                       description="Sign every file of DIR, manifest.json included, into DIR/model.sig in the "
                       "OpenSSF model-signing format.")
    p.add_argument("dir", help="export folder")
    p.add_argument("--key", required=True, help="private key (.pem)")
    add_passphrase_option(p)
    p.set_defaults(func=run_sign)


def run_sign(a) -> Outcome:
    from . import manifest as mf
    from .signing import sign

    folder = Path(a.dir)
    mf.read(folder)  # only manifest-bearing export folders are signed by this tool
    sig = sign(folder, Path(a.key), passphrase_from(a.passphrase_env))
    return Outcome({"dir": str(folder), "signature": str(sig)}, f"signed: {sig}")


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an export folder's signature, manifest and every file's digest",
                       description="Exit 0 only if the signature is valid for the public key and every file matches "
                       "both the signature and the manifest; otherwise exit 3 and name each problem.")
    p.add_argument("dir", help="export folder")
    p.add_argument("--public-key", required=True, help="public key (.pub)")
    p.set_defaults(func=run_verify)


def run_verify(a) -> Outcome:
    from .signing import verify

    v = verify(Path(a.dir), Path(a.public_key))
    text = (f"verified: {a.dir} ({v.files_checked} files; signature and manifest match)" if v.ok else
            f"verification FAILED for {a.dir}:\n" + "\n".join(f"  - {p}" for p in v.problems))
    return Outcome({"dir": a.dir, "verified": v.ok, "problems": v.problems, "files_checked": v.files_checked},
                   text, EXIT_OK if v.ok else EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-bridge", description=__doc__.split("\n")[0],
                                     epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 check failed.")
    parser.add_argument("--version", action="version", version=f"qlora-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_init, add_release, add_plan, add_train, add_merge, add_compare, add_export, add_serve, add_smoke,
                add_plugins, add_keygen,
                add_sign, add_verify):
        add(sub)
    for name in ("release", "compare", "train", "merge", "export"):  # the verbs that write folders
        sub.choices[name].add_argument(
            "--wait", action="store_true", help="when another run is writing the same folder, wait for it to "
            "finish instead of exiting 2 (then reuse or refuse what it wrote, as if it had finished before)")
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
        p.add_argument("--project", metavar="FILE", help="project file (default: ./qlora-bridge.toml if present, "
                       "else the embedded demo project)")
    return parser


def interrupt(signum, frame):
    raise KeyboardInterrupt  # so that every `finally` runs: servers stopped, staging folders removed


def main(argv: list[str] | None = None) -> int:
    import signal

    from .files import WAIT

    args = build_parser().parse_args(argv)
    if getattr(args, "wait", False):  # a policy for every folder this run writes, its subprocesses' included
        os.environ[WAIT] = "1"
    quiet_libraries()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        outcome = args.func(args)
    except BridgeError as e:
        if args.json:
            print(json.dumps(e.to_dict()))
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was left that looks finished", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"ok": outcome.exit_code == EXIT_OK, "exit_code": outcome.exit_code, **outcome.data},
                         default=str))
    elif not outcome.quiet:
        print(outcome.text)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
