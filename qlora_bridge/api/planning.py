"""What `qlora-bridge plan` reads a model as, and what a registration's `memory` returns: a stage's needs as named
terms, so a report can say why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as `qlora-bridge plan` sees it: read from config.json, no weights needed.

    Llama-2-7B's config gives ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
    head_dim=128, vocab=32000, dtype_bytes=2): .params 6.74e9, .kv_bytes(4096) 2.1 GB (float16 cache).
    """
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix
    dtype_bytes: int = 2  # bytes per weight of the checkpoint a stage reads: 2 for a bf16 base, 4 for a float32 merge

    def linears(self) -> dict[str, tuple[int, int]]:
        """One layer's linear modules, name -> (in, out): what QLoRA quantizes and LoRA targets."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def largest_linear(self) -> int:
        """Weights of one layer's largest linear module: what a stage dequantizes or merges at a time."""
        return max(a * b for a, b in self.linears().values())

    @property
    def largest_matrix(self) -> int:
        """Weights of the largest tensor, the embedding included: what a streaming stage holds at a time."""
        return max(self.vocab * self.hidden, self.largest_linear)

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def dense_params(self) -> int:
        """Everything that is not a quantized linear: embeddings, lm_head, norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.dense_params

    def kv_bytes(self, tokens: int, bytes_per: int = 2) -> int:
        """KV cache for `tokens` positions: a key and a value per layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * bytes_per


# What a process that uses the GPU holds there outside torch's allocator (the CUDA context, cuBLAS workspace, loaded
# kernels), for a Need's GPU terms: 500-700 MB with torch 2.x on A100/H100; 749 MiB measured on an H200 with torch
# 2.11 (nvidia-smi minus torch.cuda.max_memory_reserved, bench/gpu_e2e.py's train stage).
CUDA_CONTEXT = 700 << 20


@dataclass(frozen=True)
class Need:
    """One stage's peak GPU memory, host memory and disk, in bytes, each as named terms so a report can say why.

        Need(host={"runtime": 600 << 20, "largest tensor, float32": 4 * 32000 * 4096},
             disk={"output": 4 * 6_738_415_616}, notes=("streams tensor by tensor",))
    """
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)  # anonymous memory: what must fit in RAM
    disk: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    output: int = 0  # bytes of what the stage hands on: an export's artifact, which serving loads
    # clean file-backed pages of an input a tool maps and reads once (llama.cpp's quantizer over its F16 file):
    # resident while there is room, dropped by the kernel under pressure and read again, so reported beside
    # host memory, not counted in it
    mapped: dict[str, int] = field(default_factory=dict)
    # the same stage under other settings, as (the setting, its Need): the plan uses the one an export's options
    # name, and where the stage does not fit names the first that does, e.g. (("--option engine=x", Need(...)),)
    variants: tuple = ()

    def total(self, where: str) -> int:
        return sum(getattr(self, where).values())
