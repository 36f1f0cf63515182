"""What `train` takes: the project file's [train] table and train's flags, validated. No torch here: reading a
project file must not load it."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BridgeError

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit types
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")
LAUNCHERS = ("torchrun", "accelerate")


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
    # data parallel: processes on this machine (one per GPU, or CPU processes with the gloo backend), each taking
    # batch_size records of every step's global batch; the training record notes world size and strategy
    processes: int = 1
    strategy: str = "ddp"  # ddp | fsdp (FSDP-QLoRA: base weights sharded across GPUs)
    launcher: str = "torchrun"  # torchrun (torch.distributed.run) | accelerate (`accelerate launch`, GPUs)

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
            (isinstance(self.processes, int) and self.processes >= 1, "processes", "use a positive integer"),
            (self.strategy in STRATEGIES, "strategy", f"use one of {', '.join(STRATEGIES)}"),
            (self.strategy != "fsdp" or self.processes > 1, "strategy", "FSDP shards across processes: set processes "
             "to 2 or more"),
            (self.launcher in LAUNCHERS, "launcher", f"use one of {', '.join(LAUNCHERS)}"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise BridgeError(f"invalid value {getattr(self, name.split('/')[0])!r}", field=name, fix=fix)
