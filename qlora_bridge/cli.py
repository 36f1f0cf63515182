"""The `qlora-bridge` command: one verb per stage, a thin layer over the library.

Exit codes: 0 success; 1 internal error (a bug: traceback shown); 2 bad input (the message names the file, the
field and the fix); 3 a check failed (the work ran but its result must not be trusted); 130 interrupted.
Every verb takes --json and then prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import EXIT_OK, BridgeError


@dataclass
class Outcome:
    data: dict
    text: str
    exit_code: int = EXIT_OK
    extra: dict = field(default_factory=dict)


def quiet_libraries() -> None:
    # bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
    p.add_argument("--out", default="qlora-bridge-out/adapter", help="adapter folder to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
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
    p.set_defaults(func=run_train)


def run_train(a) -> Outcome:
    from . import demo
    from .data import load_heldout
    from .default_model import resolve_base
    from .train import TrainSettings, train

    values = dict(demo.TRAIN_OVERRIDES) if a.data is None else {}
    for name in TrainSettings.__dataclass_fields__:
        if getattr(a, name, None) is not None:
            values[name] = getattr(a, name)
    if a.no_double_quant:
        values["double_quant"] = False
    if isinstance(values.get("target_modules"), str) and values["target_modules"] != "all-linear":
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    settings = TrainSettings(**values)
    data = Path(a.data) if a.data else demo.train_file()
    heldout_path = a.heldout or (demo.heldout_file() if a.data is None else None)
    heldout = load_heldout(heldout_path) if heldout_path else None
    result = train(resolve_base(a.base), data, Path(a.out), settings, heldout=heldout, force=a.force,
                   progress=True)
    rec = result.record
    lines = [f"adapter: {result.adapter}",
             f"steps: {rec['steps']}  loss {rec['loss_curve'][0]:.3f} -> {rec['loss_curve'][-1]:.3f}  "
             f"train {rec['train_seconds']:.0f} s  wall {rec['wall_seconds']:.0f} s  "
             f"peak RSS {rec['peak_rss_mib']:.0f} MiB  ({settings.quant} base)"]
    if rec["heldout"]:
        before, after = rec["heldout"]["before"], rec["heldout"]["after"]
        lines.append(f"held-out exact match: before {before['exact_match']:.0%} -> after {after['exact_match']:.0%} "
                     f"({after['n']} prompts from {heldout_path})")
        for b, f in list(zip(before["answers"], after["answers"]))[:3]:
            lines += [f"  expected: {b['expected']}", f"    before: {b['got'].strip()[:100]!r}",
                      f"    after:  {f['got'].strip()[:100]!r}"]
    data_out = {"adapter": str(result.adapter), "record": rec}
    return Outcome(data_out, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-bridge", description=__doc__.split("\n")[0],
                                     epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 check failed.")
    parser.add_argument("--version", action="version", version=f"qlora-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train,):
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
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
    else:
        print(outcome.text)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
