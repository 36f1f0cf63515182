"""`qlora-bridge train`: QLoRA (or, as a baseline, plain LoRA) on a local Hugging Face model folder.

The 4-bit base is bitsandbytes NF4 with double quantization; the LoRA adapters train in float32. The output is a
standard peft adapter folder plus `training_record.json`, which holds what the exact merge relies on: the
quantization settings, the bitsandbytes version, the base files' digests and a fingerprint of the NF4 weights.
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .data import Dataset, collate, load_dataset, load_heldout
from .errors import BridgeError
from .files import digest_folder, output_folder, sha256_file, write_json
from .manifest import environment
from .quant import BLOCKSIZE, QUANT_TYPES, QuantSettings, assert_standard_layout, disable_cpu_packed_layout, \
    fingerprint

RECORD = "training_record.json"
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainSettings:
    quant: str = "nf4"  # nf4 | fp4 | none (plain LoRA on the unquantized base)
    double_quant: bool = True
    compute_dtype: str = "float32"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    steps: int | None = None  # when set, overrides epochs
    epochs: float = 1.0
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    truncate: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: str = "auto"  # auto | adamw | adamw8bit | paged_adamw8bit

    def validate(self) -> None:
        checks = [
            (self.quant in (*QUANT_TYPES, "none"), "quant", f"use one of {', '.join((*QUANT_TYPES, 'none'))}"),
            (self.compute_dtype in ("float32", "bfloat16", "float16"), "compute_dtype",
             "use float32, bfloat16 or float16"),
            (self.rank > 0 and self.alpha > 0, "rank/alpha", "use positive integers"),
            (0 <= self.dropout < 1, "dropout", "use a value in [0, 1)"),
            (self.steps is None or self.steps > 0, "steps", "use a positive number of steps"),
            (self.epochs > 0, "epochs", "use a positive number of epochs"),
            (self.learning_rate > 0, "learning_rate", "use a positive learning rate"),
            (self.schedule in SCHEDULES, "schedule", f"use one of {', '.join(SCHEDULES)}"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size/grad_accum", "use positive integers"),
            (self.max_seq_len > 0, "max_seq_len", "use a positive length"),
            (self.optimizer in ("auto", "adamw", "adamw8bit", "paged_adamw8bit"), "optimizer",
             "use auto, adamw, adamw8bit or paged_adamw8bit"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise BridgeError(f"invalid value {getattr(self, name.split('/')[0])!r}", field=name, fix=fix)


@dataclass
class TrainResult:
    adapter: Path
    record: dict = field(repr=False)


def check_base(base: Path) -> None:
    """A base must be a Hugging Face causal-LM folder with safetensors weights and a tokenizer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (base / "config.json").is_file():
        raise BridgeError("not a Hugging Face model folder (no config.json)", file=base,
                          fix="pass the folder that holds config.json, the safetensors weights and the tokenizer")
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    archs = config.architectures or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        what = f"architectures {archs}" if archs else f"model_type '{config.model_type}'"
        raise BridgeError(f"{what} is not a causal language model", file=base / "config.json",
                          field="architectures" if archs else "model_type",
                          fix="pass a decoder-only (causal LM) model such as Llama, Qwen or Gemma")
    if not any(base.glob("*.safetensors")):
        pickles = [p.name for p in base.glob("*.bin")]
        raise BridgeError("no safetensors weights" + (f" (only pickle files: {', '.join(pickles)})" if pickles else ""),
                          file=base, fix="convert the checkpoint to safetensors; pickle checkpoints are never loaded")
    if not any((base / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise BridgeError("the model folder has no tokenizer (tokenizer.json or tokenizer.model)", file=base,
                          fix="save the tokenizer into the model folder (tokenizer.save_pretrained)")


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: Path, s: TrainSettings):
    """The base model, quantized to 4 bits unless `quant` is 'none', with the CPU packed layout disabled."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "trust_remote_code": False}
    if s.quant != "none":
        kwargs["quantization_config"] = QuantSettings(s.quant, s.double_quant, s.compute_dtype).to_bnb_config()
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if s.quant != "none":
        disable_cpu_packed_layout(model)
    return model


def make_optimizer(params, s: TrainSettings):
    import torch

    name = s.optimizer
    if name == "auto":  # paged optimizers only fall back to plain ones on CPU, with a warning
        name = "paged_adamw8bit" if torch.cuda.is_available() else "adamw"
    if name == "adamw":
        return name, torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return name, cls(params, lr=s.learning_rate, weight_decay=0.0)


def batches(ds: Dataset, s: TrainSettings, total_micro: int):
    """Micro-batches over shuffled epochs, as many as the schedule needs."""
    rng = random.Random(s.seed)
    order: list[int] = []
    for _ in range(total_micro):
        if len(order) < s.batch_size:
            more = list(range(len(ds.examples)))
            rng.shuffle(more)
            order += more
        chunk, order = order[: s.batch_size], order[s.batch_size:]
        yield [ds.examples[i] for i in chunk]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(base: Path, dataset: Path, out: Path, s: TrainSettings, *, heldout_file: Path | None = None,
          force: bool = False, progress: bool = True) -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tqdm import tqdm
    from transformers import get_scheduler

    from .evaluate import exact_match

    s.validate()
    base, out = Path(base), Path(out)
    if out.exists() and not force:
        raise BridgeError("the output folder already exists", file=out, fix="choose another --out, or pass --force")
    check_base(base)
    started = time.time()
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    tok = load_tokenizer(base)
    ds = load_dataset(dataset, tok, s.max_seq_len, s.truncate)
    heldout = load_heldout(heldout_file) if heldout_file else None
    model = load_model(base, s)
    record: dict = {"tool": {"name": "qlora-bridge", "version": __version__}, "settings": asdict(s)}
    if s.quant != "none":
        record["quantization"] = {"quant_type": s.quant, "double_quant": s.double_quant, "blocksize": BLOCKSIZE,
                                  "compute_dtype": s.compute_dtype, "fingerprint": fingerprint(model),
                                  # CUDA and CPU kernels round NF4 differently: the merge rebuilds it on this kind
                                  "device": model.device.type}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # peft names the target modules it could not find
        raise BridgeError(str(e), field="target_modules", fix="name modules that exist in the base model, "
                          "or use all-linear") from None
    bar = lambda total, desc: tqdm(total=total, desc=desc, disable=not progress, mininterval=1.0, leave=False)

    evals = {}
    if heldout:
        with bar(len(heldout), "held-out before") as pb:
            evals["before"] = exact_match(model, tok, heldout, progress=pb.update)

    per_epoch = math.ceil(len(ds.examples) / (s.batch_size * s.grad_accum))
    total_steps = s.steps or max(1, math.ceil(per_epoch * s.epochs))
    opt_name, opt = make_optimizer([p for p in model.parameters() if p.requires_grad], s)
    sched = get_scheduler(s.schedule, opt, num_warmup_steps=s.warmup_steps, num_training_steps=total_steps)
    pad = tok.pad_token_id
    model.train()
    losses = []
    micro = batches(ds, s, total_steps * s.grad_accum)
    t_train = time.time()
    with bar(total_steps, "training") as pb:
        for step in range(1, total_steps + 1):
            step_loss = 0.0
            for _ in range(s.grad_accum):
                batch = {k: v.to(model.device) for k, v in collate(next(micro), pad).items()}
                loss = model(**batch).loss / s.grad_accum
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                raise BridgeError(f"the loss became {step_loss} at step {step}", field="learning_rate",
                                  fix="lower --learning-rate or use --compute-dtype float32")
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(step_loss, 5))
            pb.update(1)
            pb.set_postfix(loss=f"{step_loss:.3f}")
    train_seconds = time.time() - t_train

    if heldout:
        with bar(len(heldout), "held-out after") as pb:
            evals["after"] = exact_match(model, tok, heldout, progress=pb.update)
    if s.quant != "none":
        assert_standard_layout(model)

    record.update({
        "base": {"path": str(base.resolve()), "files": digest_folder(base)},
        "dataset": {"path": str(Path(dataset).resolve()), "sha256": sha256_file(dataset), "shape": ds.shape,
                    "records": len(ds.examples), "answer_tokens": ds.answer_tokens,
                    "truncated_lines": ds.truncated, "dropped_lines": ds.dropped, "warnings": ds.warnings},
        "optimizer": opt_name,
        "steps": total_steps,
        "loss_curve": losses,
        "heldout": {k: v.to_dict() for k, v in evals.items()} | (
            {"path": str(Path(heldout_file).resolve())} if heldout_file else {}),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": None,
        "environment": environment(),
    })
    with output_folder(out, force=force, what="adapter folder") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record["wall_seconds"] = round(time.time() - started, 2)
        write_json(tmp / RECORD, record)  # last: an adapter folder without its record is not finished
    return TrainResult(out, record)

