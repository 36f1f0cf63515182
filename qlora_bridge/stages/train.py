"""`qlora-bridge train`: QLoRA (or, as a baseline, plain LoRA) on a local Hugging Face model folder.

The 4-bit base is bitsandbytes NF4 with double quantization; the LoRA adapters train in float32. The output is a
standard peft adapter folder plus `training_record.json`, which holds what the exact merge relies on: the
quantization settings, the bitsandbytes version, the base files' digests and a fingerprint of the NF4 weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data import IGNORE_INDEX, Dataset, collate, load_dataset, load_heldout
from ..errors import BridgeError
from ..files import check_output, digest_folder, output_folder, sha256_file, writer_lock
from ..manifest import environment
from ..models import check_base, load_model, load_tokenizer, peak_rss_mib
from ..quant import BLOCKSIZE, assert_standard_layout, fingerprint
from ..records import TRAINING_RECORD, TrainingRecord, read_training_record, write_training_record
from ..train_settings import TrainSettings


@dataclass
class TrainResult:
    adapter: Path
    record: TrainingRecord | None = field(repr=False)  # None in the ranks other than 0, which write nothing


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


def batches(ds: Dataset, size: int, seed: int, total_micro: int):
    """Micro-batches of `size` records over shuffled epochs, as many as the schedule needs. Data-parallel processes
    draw the same global micro-batches and each takes its share, so N processes see what one process would."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(total_micro):
        if len(order) < size:
            more = list(range(len(ds.examples)))
            rng.shuffle(more)
            order += more
        chunk, order = order[:size], order[size:]
        yield [ds.examples[i] for i in chunk]


def launch(base: Path, dataset: Path, out: Path, s: TrainSettings, heldout_file: Path | None, force: bool,
           progress: bool) -> TrainResult:
    """Start `s.processes` processes on this machine, each running train() as one rank, and wait for them.
    torchrun (torch.distributed.run) or `accelerate launch`; inside, accelerate picks the backend (NCCL on GPUs,
    gloo on CPUs). CPU threads are shared out so the processes do not fight over cores."""
    from ..ports import free_port

    port = free_port()
    job = json.dumps({"base": str(base), "dataset": str(dataset), "out": str(out), "settings": asdict(s),
                      "heldout": str(heldout_file) if heldout_file else None, "force": force, "progress": progress})
    n = str(s.processes)
    if s.launcher == "accelerate":
        start = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", n, "--num_machines", "1",
                 "--main_process_port", str(port), *(["--use_fsdp"] if s.strategy == "fsdp" else ["--multi_gpu"])]
    else:
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_addr", "127.0.0.1",
                 "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // s.processes))}
    if s.strategy == "fsdp":  # transformers then loads the weights on rank 0 only; FSDP sends each rank its shard
        env.update(ACCELERATE_USE_FSDP="1", FSDP_CPU_RAM_EFFICIENT_LOADING="1")
    rc = subprocess.run([*start, "-m", "qlora_bridge.stages.train", job], env=env).returncode
    if rc != 0:
        raise RuntimeError(f"{s.processes} training processes ({s.launcher}, {s.strategy}) failed with exit code {rc}; "
                           "their output is above")
    return TrainResult(out, read_training_record(out))


def check_parallel(s: TrainSettings, gpus: int) -> None:
    """What data-parallel training needs, checked before any process starts (known pitfalls, not discoveries)."""
    if s.launcher == "accelerate" and not gpus:
        raise BridgeError("`accelerate launch` starts a single process on a machine without GPUs", field="launcher",
                          fix='use launcher = "torchrun" for CPU processes (gloo backend)')
    if gpus and s.processes > gpus:
        raise BridgeError(f"{s.processes} processes but {gpus} GPUs: two processes on one GPU each hold the whole "
                          "4-bit model", field="processes", fix=f"use processes <= {gpus}")
    if s.strategy == "fsdp" and not gpus:
        raise BridgeError("FSDP-QLoRA shards the 4-bit base across GPUs; it is not built for CPU processes",
                          field="strategy", fix="use strategy = \"ddp\" on CPUs")


def checked_base(base: str | Path | None, dataset: Path, heldout: Path | None) -> Path:
    """The inputs of a training run checked before anything costly (a base the user named costs nothing to check,
    the data is named line by line), then the base folder: the one named, or the embedded default, converted on
    first use."""
    from ..data import check_data, require_file
    from ..default_model import resolve_base

    if base:
        check_base(Path(base))
    for path, what in ((dataset, "training data"), (heldout, "held-out data")):
        if path is not None:
            require_file(path, what, field="data",
                         fix="fix the path (in qlora-bridge.toml, relative to it, or the command's flag)")
    check_data(dataset, heldout)
    resolved = resolve_base(base)
    check_base(resolved)
    return resolved


def train(base: Path, dataset: Path, out: Path, s: TrainSettings, *, heldout_file: Path | None = None,
          force: bool = False, progress: bool = True) -> TrainResult:
    """Train an adapter into `out`. The folder is claimed before training starts, not when it is written an hour
    later: a second run to the same folder is refused at once (the ranks launch() starts inherit the claim)."""
    s.validate()
    with writer_lock(out, what="adapter folder"):
        check_output(out, force=force, what="adapter folder", marker=TRAINING_RECORD)
        return train_claimed(Path(base), dataset, Path(out), s, heldout_file=heldout_file, force=force,
                             progress=progress)


def train_claimed(base: Path, dataset: Path, out: Path, s: TrainSettings, *, heldout_file: Path | None,
                  force: bool, progress: bool) -> TrainResult:
    import torch
    from transformers import get_scheduler

    check_base(base)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if s.processes > 1 and world == 1:  # this process starts the ranks; each comes back here with WORLD_SIZE set
        check_parallel(s, torch.cuda.device_count())
        return launch(base, dataset, out, s, heldout_file, force, progress)
    acc = parallel(s) if world > 1 else None
    rank = acc.process_index if acc else 0
    progress = progress and rank == 0
    started = time.time()
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    tok = load_tokenizer(base)
    ds = load_dataset(dataset, tok, s.max_seq_len, s.truncate)
    heldout = load_heldout(heldout_file) if heldout_file else None
    model, quantization = lora_model(base, s)
    evals = {"before": answer(model, tok, heldout, "before", progress)} if heldout and rank == 0 else {}

    per_epoch = math.ceil(len(ds.examples) / (s.batch_size * world * s.grad_accum))
    total_steps = s.steps or max(1, math.ceil(per_epoch * s.epochs))
    opt_name, opt = make_optimizer([p for p in model.parameters() if p.requires_grad], s)
    sched = get_scheduler(s.schedule, opt, num_warmup_steps=s.warmup_steps, num_training_steps=total_steps)
    losses, train_seconds = run_steps(model, opt, sched, ds, tok.pad_token_id, s, total_steps, acc, progress)
    peak_rss = peak_rss_mib()
    if acc:  # the record speaks for the largest process; then rank 0 alone evaluates and writes
        peak = torch.tensor([peak_rss])
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        peak_rss = peak.item()
        if rank != 0:
            acc.wait_for_everyone()
            return TrainResult(out, None)
    if heldout:
        evals["after"] = answer(model, tok, heldout, "after", progress)
    if s.quant != "none":
        assert_standard_layout(model)

    record = TrainingRecord(
        settings=asdict(s), quantization=quantization, base={"path": str(base.resolve()), "files": digest_folder(base)},
        dataset=dataset_entry(dataset, ds), optimizer=opt_name, steps=total_steps, loss_curve=losses,
        heldout={k: v.to_dict() for k, v in evals.items()} | (
            {"path": str(Path(heldout_file).resolve())} if heldout_file else {}),
        peak_rss_mib=round(peak_rss, 1), distributed=distributed_entry(world, s, acc),
        peak_cuda_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        train_seconds=round(train_seconds, 2), environment=environment())
    with output_folder(out, force=force, what="adapter folder", marker=TRAINING_RECORD) as tmp:
        for config in model.peft_config.values():  # the base as the record names it, so merge can compare the two
            config.base_model_name_or_path = record.base["path"]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = replace(record, wall_seconds=round(time.time() - started, 2))
        write_training_record(tmp, record)  # last: an adapter folder without its record is not finished
    if acc:
        acc.wait_for_everyone()
    return TrainResult(out, record)


def dataset_entry(dataset: Path, ds: Dataset) -> dict:
    return {"path": str(Path(dataset).resolve()), "sha256": sha256_file(dataset), "shape": ds.shape,
            "records": len(ds.examples), "answer_tokens": ds.answer_tokens, "truncated_lines": ds.truncated,
            "dropped_lines": ds.dropped, "warnings": ds.warnings}


def distributed_entry(world: int, s: TrainSettings, acc) -> dict:
    return {"world_size": world, "strategy": s.strategy if acc else None,
            "backend": acc.state.backend if acc else None, "launcher": s.launcher if acc else None}


def lora_model(base: Path, s: TrainSettings):
    """The 4-bit base (fingerprinted as bitsandbytes built it, for the exact merge) with LoRA adapters on it, and
    the training record's quantization section (None for plain LoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, quantization = load_model(base, s), None
    if s.quant != "none":
        quantization = {"quant_type": s.quant, "double_quant": s.double_quant, "blocksize": BLOCKSIZE,
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
        return get_peft_model(model, lora), quantization
    except ValueError as e:  # peft names the target modules it could not find
        raise BridgeError(str(e), field="target_modules", fix="name modules that exist in the base model, "
                          "or use all-linear") from None


def answer(model, tok, heldout, when: str, progress: bool):
    from tqdm import tqdm

    from ..measure.evaluate import exact_match

    with tqdm(total=len(heldout), desc=f"held-out {when}", disable=not progress, mininterval=1.0, leave=False) as pb:
        return exact_match(model, tok, heldout, progress=pb.update)


def run_steps(model, opt, sched, ds: Dataset, pad: int, s: TrainSettings, total_steps: int, acc,
              progress: bool) -> tuple[list[float], float]:
    """The optimizer steps: the loss curve and the seconds they took. With several processes each takes its share of
    every global micro-batch and the model is wrapped (DDP or FSDP) for the steps only."""
    import torch
    from tqdm import tqdm

    rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
    device = model.device
    if acc:
        acc.wait_for_everyone()  # rank 0 was answering the held-out prompts
        model, opt = acc.prepare(model, opt)
    model.train()
    losses = []
    micro = batches(ds, s.batch_size * world, s.seed, total_steps * s.grad_accum)
    started = time.time()
    with tqdm(total=total_steps, desc="training", disable=not progress, mininterval=1.0, leave=False) as pb:
        for step in range(1, total_steps + 1):
            step_loss = 0.0
            for _ in range(s.grad_accum):
                mine = next(micro)[rank * s.batch_size:(rank + 1) * s.batch_size]
                batch = {k: v.to(device) for k, v in collate(mine, pad).items()}
                if acc is None:
                    loss = model(**batch).loss / s.grad_accum
                    loss.backward()
                    step_loss += loss.item()
                else:
                    step_loss += shared_loss_backward(model, batch, acc, world) / s.grad_accum
            if not math.isfinite(step_loss):
                raise BridgeError(f"the loss became {step_loss} at step {step}", field="learning_rate",
                                  fix="lower --learning-rate or use --compute-dtype float32")
            trainable = [p for p in model.parameters() if p.requires_grad]
            acc.clip_grad_norm_(trainable, 1.0) if acc else torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(step_loss, 5))
            pb.update(1)
            pb.set_postfix(loss=f"{step_loss:.3f}")
    return losses, time.time() - started


def parallel(s: TrainSettings):
    """This rank's accelerate state: DDP, or FSDP set up for QLoRA (not yet run on GPUs: none was available)."""
    import torch
    from accelerate import Accelerator

    if not torch.cuda.is_available():  # without cpu=True, accelerate 1.15 treats CPU ranks as one process each
        return Accelerator(cpu=True)
    if s.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        # frozen 4-bit weights and trainable LoRA weights share FSDP units: use_orig_params lets one flat parameter
        # mix requires_grad; the weights are loaded on rank 0 and sent out (sync_module_states); the 4-bit storage
        # is a float dtype (QuantSettings.storage) so that it can be flattened with the rest
        return Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True,
                                                                      cpu_ram_efficient_loading=True))
    return Accelerator()


def shared_loss_backward(model, batch: dict, acc, world: int) -> float:
    """One micro-batch's share of the global loss, back-propagated: each rank's summed token losses over the tokens of
    every rank (so the ranks' gradients, averaged by DDP, are the one-process gradient of the same global batch, not
    an average of per-rank means), and the global mean loss for the curve."""
    import torch

    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.distributed.all_reduce(tokens)
    loss = model(**batch, num_items_in_batch=tokens).loss
    acc.backward(loss * world)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item()


if __name__ == "__main__":  # one rank of a data-parallel run (launch)
    job = json.loads(sys.argv[1])
    train(Path(job["base"]), Path(job["dataset"]), Path(job["out"]), TrainSettings(**job["settings"]),
          heldout_file=Path(job["heldout"]) if job["heldout"] else None, force=job["force"], progress=job["progress"])

