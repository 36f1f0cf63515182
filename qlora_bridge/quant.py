"""The 4-bit NF4 base: loading it through bitsandbytes, guarding its layout, fingerprinting it, and rebuilding it
for the merge.

The fingerprint is a digest of exactly what bitsandbytes built (packed 4-bit codes, block scales, the nested
double-quant state and code maps) per layer. The merge rebuilds NF4 from the base checkpoint and must
reproduce it bit for bit, which proves it adds the adapter to the weights the adapter was trained against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import CheckFailed

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size; recorded so a merge can refuse a different one


@dataclass(frozen=True)
class QuantSettings:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    # the dtype the packed 4-bit codes are stored as: FSDP flattens a module's parameters into one tensor of one
    # dtype, so FSDP-QLoRA stores them as the float dtype of the rest (the bytes are the same)
    storage: str = "uint8"

    def to_bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                  bnb_4bit_quant_storage=getattr(torch, self.storage))


def linear4bit_modules(model):
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_packed_layout(model) -> int:
    """Keep bitsandbytes off its CPU packed path (research README, fact 1).

    On a CPU with avx512_bf16, one eval-mode no-grad forward of a Linear4bit rewrites its weight and quant
    state into a CPU-only layout; from then on dequantize and every merge silently return garbage.
    """
    mods = linear4bit_modules(model)
    for _, m in mods:
        m.support_avx512bf16_for_cpu = False
    return len(mods)


def assert_standard_layout(model) -> None:
    """Raise if any 4-bit layer was rewritten into the CPU packed layout (its weights are then unusable)."""
    packed = [name for name, m in linear4bit_modules(model)
              if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if packed:
        raise RuntimeError(f"{len(packed)} 4-bit layers are in bitsandbytes' CPU packed layout (first: "
                           f"{packed[0]}); their dequantized weights are corrupt. Call "
                           "disable_cpu_packed_layout() right after loading.")


def quant_state_tensors(weight, qs) -> list[torch.Tensor]:
    """Every tensor that determines the dequantized weight, in a fixed order."""
    parts = [weight, qs.absmax, qs.code]
    if qs.nested:
        parts += [qs.state2.absmax, qs.state2.code, torch.as_tensor(qs.offset, dtype=torch.float32)]
    return parts


def state_digest(weight, qs) -> str:
    h = hashlib.sha256()
    for i, t in enumerate(quant_state_tensors(weight, qs)):
        t = t.detach().reshape(-1).contiguous().cpu()
        if i == 0:  # the packed codes: the same bytes whatever dtype they are stored as (QuantSettings.storage)
            t = t.view(torch.uint8)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model) -> dict:
    """Per-layer digests of the quantized weights, plus the dtype each was quantized from, and one overall digest."""
    assert_standard_layout(model)
    layers = {}
    for name, m in linear4bit_modules(model):
        qs = m.weight.quant_state
        layers[_checkpoint_name(name)] = {"sha256": state_digest(m.weight, qs), "shape": list(qs.shape),
                                          "source_dtype": str(qs.dtype).removeprefix("torch."),
                                          "blocksize": qs.blocksize}
    overall = hashlib.sha256("".join(f"{k}={v['sha256']};" for k, v in sorted(layers.items())).encode())
    return {"layers": layers, "sha256": overall.hexdigest()}


def _checkpoint_name(module_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj.weight'."""
    name = module_name.removeprefix("base_model.model.")
    return f"{name}.weight"


def nf4_device(quant: dict, inexact: bool) -> str:
    """Where to rebuild NF4: where training built it, since bitsandbytes' CUDA and CPU kernels round differently."""
    import bitsandbytes as bnb

    trained_on = quant.get("device", "cpu")
    if trained_on == "cpu" or torch.cuda.is_available():
        return trained_on
    if inexact:
        return "cpu"
    raise CheckFailed("the adapter was trained on a CUDA GPU, and bitsandbytes' CUDA and CPU kernels round NF4 "
                      "differently (on an H200 with bitsandbytes 0.50.2, 13 of 14 layers differed, by up to 1.3e-3 "
                      f"relative; this is bitsandbytes {bnb.__version__}), so the exact rebuild needs a CUDA GPU",
                      field="quantization.device", fix="run the merge on a machine with a CUDA GPU, or pass "
                      "--inexact-nf4 to rebuild NF4 on the CPU (unproven: ~1e-3 off the trained weights, against "
                      "~0.09 for --base-weights original)")


def nf4_base_weight(w: torch.Tensor, key: str, quant: dict, device: str, inexact: bool) -> torch.Tensor:
    """dequant(nf4(w)) exactly as training built it, after proving the rebuild matches its fingerprint."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    fp = quant["fingerprint"]["layers"][key]
    src = w.to(device=device, dtype=getattr(torch, fp["source_dtype"]))
    packed, qs = quantize_4bit(src, blocksize=fp["blocksize"], compress_statistics=quant["double_quant"],
                               quant_type=quant["quant_type"])
    if not inexact and state_digest(packed, qs) != fp["sha256"]:
        raise FingerprintMismatch(key, quant.get("bitsandbytes_version"), bnb.__version__)
    return dequantize_4bit(packed, qs).float().cpu()


class FingerprintMismatch(CheckFailed):
    def __init__(self, key: str, trained_with: str | None, have: str):
        cause = (f"training used bitsandbytes {trained_with} and this is {have}; its NF4 codes differ between "
                 "versions" if trained_with and trained_with != have else
                 "the base weights differ from the ones the adapter was trained on")
        super().__init__(f"the NF4 weights rebuilt for {key} do not match the fingerprint recorded in training: "
                         f"{cause}", field="quantization.fingerprint",
                         fix=f"merge with bitsandbytes {trained_with or 'as used in training'} and the same base, or "
                         "pass --base-weights original (a different model from the one trained)")
