"""Our own reader (and writer, for tests) of the two packed int4/int8 checkpoint formats vLLM serves.

Notation: a Linear's weight W is [N out, K in]; q are unsigned codes, z zero points, s scales, one per group of
`group` input channels. Values are packed 32/bits to an int32 word, value i at bits [i*bits, (i+1)*bits).

GPTQ, checkpoint format v1 (what vLLM and transformers read as `quant_method: gptq`):
    qweight [K*bits/32, N]  packed along the input dim, in order
    qzeros  [G, N*bits/32]  packed along the output dim, in order, stored as z - 1 (the v1 quirk)
    scales  [G, N], g_idx [K] (the group of each input channel)
    W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
AWQ GEMM (`quant_method: awq`, `version: gemm`), 4-bit only:
    qweight [K, N/8]  packed along the output dim, word nibble i holding column 8c + AWQ_ORDER[i]
    qzeros  [G, N/8]  same interleaving, z stored as is
    scales  [G, N];  W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]
Verified bit-exact against gptqmodel 7.6 and AutoAWQ output in the research notes (awq-gptq-quantizers.md).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its block of 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a block comes from nibble AWQ_REVERSE[j]


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., M] -> unsigned codes [..., M, 32 // bits], lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., M, 32 // bits] -> int32 words [..., M] (the inverse of unpack). One code slot at a
    time: a 70B layer's codes widened to int64 all at once would take 8 bytes a weight."""
    words = torch.zeros(codes.shape[:-1], dtype=torch.int64)
    for i in range(codes.shape[-1]):
        words |= codes[..., i].to(torch.int64) << (i * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_codes(qweight, qzeros, bits: int, v1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [K, N], z [G, N]) codes of a GPTQ layer; v1=False for GPTQModel's checkpoint format v2, which stores
    z itself (v1's z - 1 cannot hold the zero point 0 of an asymmetric group)."""
    per_word = 32 // bits
    q = unpack(qweight, bits).permute(0, 2, 1).reshape(qweight.shape[0] * per_word, qweight.shape[1])
    z = unpack(qzeros, bits).reshape(qzeros.shape[0], -1) + int(v1)
    return q, z


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    q, z = gptq_codes(qweight, qzeros, bits)
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).T.contiguous()


def gptq_pack(q: torch.Tensor, z: torch.Tensor, bits: int, v1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q [K, N] and z [G, N] codes -> (qweight, qzeros) in checkpoint format v1 (or v2: v1=False)."""
    per_word = 32 // bits
    k, n = q.shape
    qweight = pack(q.reshape(k // per_word, per_word, n).permute(0, 2, 1), bits)
    qzeros = pack((z - int(v1)).clamp(min=0).reshape(z.shape[0], n // per_word, per_word), bits)
    return qweight, qzeros


def awq_dequantize(qweight, qzeros, scales, group: int) -> torch.Tensor:
    reverse = torch.tensor(AWQ_REVERSE)
    q = unpack(qweight, 4)[..., reverse].reshape(qweight.shape[0], -1)  # [K, N]
    z = unpack(qzeros, 4)[..., reverse].reshape(qzeros.shape[0], -1)  # [G, N]
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]).float() * scales.float()[g]).T.contiguous()


def awq_pack(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [K, N] and z [G, N] codes -> (qweight, qzeros) in GEMM layout."""
    order = torch.tensor(AWQ_ORDER)

    def interleave(codes):
        return pack(codes.reshape(codes.shape[0], -1, 8)[..., order], 4)

    return interleave(q), interleave(z)


def rtn(weight: torch.Tensor, bits: int, group: int, sym: bool):
    """Round-to-nearest codes of W [N, K]: (q [K, N], z [G, N], s [G, N]); the fallback every quantizer starts from."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    top = (1 << bits) - 1
    if sym:
        s = (w.abs().amax(-1) * 2 / top).clamp(min=1e-8)
        z = torch.full_like(s, (top + 1) // 2)
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        s = ((hi - lo) / top).clamp(min=1e-8)
        z = (-lo / s).round().clamp(0, top)
    q = (w / s.unsqueeze(-1) + z.unsqueeze(-1)).round().clamp(0, top)
    return q.reshape(n, k).T.long(), z.T.long().contiguous(), s.T.contiguous()


def kept_rule(keep) -> dict | None:
    """GPTQ's `dynamic` rule that leaves the kept modules (by name) unquantized: a negative match, which GPTQModel
    writes and vLLM's GPTQ reads."""
    kinds = sorted({name.rpartition(".")[2] for name in keep})
    return {rf"-:.*\.(?:{'|'.join(kinds)})$": {}} if kinds else None


def awq_config(group: int, keep, quantizer: str) -> dict:
    """config.json's quantization_config of an AWQ GEMM checkpoint; the kept modules named in full (vLLM and
    transformers match the names as substrings of each module's)."""
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
            "modules_to_not_convert": ["lm_head", *keep], "quantizer": quantizer}
