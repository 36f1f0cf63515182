"""Engine `streamed`: GPTQ one decoder layer at a time, read from the merged shards, so memory is one layer.

GPTQModel and AutoRound load the whole merged model before they quantize (GPTQModel then keeps every layer it has
finished: 17 GB for a 1.1B model with our old read-back, issue 32). GPTQ itself needs one layer at a time:

    hidden = embed(calibration)                          # the embedding, read from the shards, then dropped
    for each decoder layer:                              # read from the shards in float32
        H[input] = sum of x xᵀ over the calibration      # one forward of the layer, hooks on its Linears
        W -> codes, zero points, scales by GPTQ (H)      # gptq() below; the layer then computes with them
        hidden = layer(hidden)                           # the next layer's calibration inputs
        write the packed layer; drop it
    norm, head: copied

The layer is called with the arguments the model itself passes it (captured once from a forward pass that
stops at the first layer: attention mask, rotary position embeddings...), so nothing here knows an architecture.
With true_sequential, a layer's Linears are quantized in the order they run, in groups that share an input
(q/k/v, o, gate/up, down), each group's Hessian taken with the groups before it already quantized.

On a GPU the layer, its Hessians and the calibration activations live on the device, the rest on the host.
Written straight into the target's format (formats.py): GPTQ v1 symmetric, or AWQ GEMM from asymmetric GPTQ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .formats import awq_config, awq_pack, gptq_pack, kept_rule

BLOCK = 128  # GPTQ's lazy-update block: columns whose updates are batched (the reference implementation's)
# calibration positions a forward takes at once: one default 512-token block, as GPTQModel's batch_size=1 (a
# quarter of the working memory of 2048; the demo's gate figures moved within their run-to-run spread, docs/gptq-awq.md)
BATCH_TOKENS = 512


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of one group of columns, w [N, group], as GPTQ's quantizer sets them: the range
    always includes 0, symmetric ranges are centred on the middle code (a row with no negative weight keeps
    [0, max]: the reference's rule, which GPTQModel keeps)."""
    top = (1 << bits) - 1
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / top
    zero = torch.full_like(scale, (top + 1) // 2) if sym else (-lo / scale).round()
    return scale, zero


def group_aware_order(diag: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQModel's act_group_aware column order (GAR, Gafni et al. 2025): groups by their most active input,
    and within each group its inputs by activity, both descending. Groups stay whole, so the file's layout and
    g_idx are those of the natural order; only the order of GPTQ's error propagation changes."""
    per_group = diag.reshape(-1, group)
    values, local = torch.sort(per_group, dim=1, descending=True)
    order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = torch.arange(per_group.shape[0], device=diag.device).unsqueeze(1) * group
    return (local + base)[order].reshape(-1)


def inverse_factor(hessian: list[torch.Tensor], group: int, damp: float):
    """What GPTQ needs of the Hessian H [K, K] of a group of Linears' shared input: the group-aware column order,
    which columns the calibration never moved, and the upper Cholesky factor R of the dampened H⁻¹ (H⁻¹ = RᵀR) in
    that order. Computed once for q/k/v (and once for gate/up), as GPTQModel shares it. `hessian` is a one-item
    list this empties, so no reference of the caller's keeps a second K x K matrix alive (down_proj of a 70B: 3.3
    GB each).

    R comes from one Cholesky factorization with the order reversed (J reverses): J H J = L Lᵀ gives
    H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so R = J L⁻¹ J. The reference's Cholesky, inverse, Cholesky again computes the same
    factor (to float32 rounding, ~6e-6 relative) in 1.8x the time (K = 8192: 31.6 s against 17.9 s on 2 shared
    cores; an 8B's down_proj, K = 14336, took 70 s of each layer's ~2 minutes the reference's way)."""
    h = hessian.pop()
    dead = torch.diag(h) == 0  # inputs the calibration never moved: their weights cannot matter to it
    h[dead, dead] = 1
    perm = group_aware_order(torch.diag(h), group)
    reverse = perm.flip(0)
    h = h[reverse]
    h = h[:, reverse]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    torch.linalg.cholesky(h, out=h)
    factor = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    torch.linalg.solve_triangular(h, factor, upper=False, out=factor)
    del h
    reverse_in_place(factor.view(-1))  # J L⁻¹ J: both orders reversed is the flat storage reversed
    return perm, dead[perm], factor


def reverse_in_place(flat: torch.Tensor, chunk: int = 1 << 22) -> None:
    """flat[::-1], swapping its ends a chunk at a time: torch.flip would allocate a third K x K matrix."""
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        j = min(i + chunk, n // 2)
        head = flat[i:j].clone()
        flat[i:j] = flat[n - j:n - i].flip(0)
        flat[n - j:n - i] = head.flip(0)


def gptq(weight: torch.Tensor, factor, bits: int, group: int, sym: bool):
    """GPTQ (Frantar et al. 2022) of W [N, K] given inverse_factor() of its input's Hessian, groups in the natural
    layout, processed in GPTQModel's group-aware order: codes q [K, N], zero points z [G, N], scales s [G, N],
    and the dequantized weight it leaves."""
    perm, dead, hinv = factor
    n, k = weight.shape
    # held as Wᵀ [K, N]: the column GPTQ rounds and the rows it updates are contiguous (on down_proj's shape 4x
    # faster than the column slices of W, the same arithmetic)
    w = weight.float().T[perm].contiguous()
    w[dead] = 0
    top = (1 << bits) - 1
    q = torch.empty(k, n, dtype=torch.uint8, device=w.device)  # codes of at most 8 bits, in GAR order
    scales = torch.empty(k // group, n, device=w.device)  # by position in GAR order
    zeros = torch.empty(k // group, n, dtype=torch.int64, device=w.device)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err = w[i1:i2].clone(), torch.empty(i2 - i1, n, device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # the range as of the block's start, as GPTQModel (and the reference) set it
                s, z = group_params(w[col: col + group].T, bits, sym)
                scales[col // group], zeros[col // group] = s, z.long()
            codes = (w1[i] / s + z).round_().clamp_(0, top)
            q[col] = codes
            e = torch.sub(w1[i], (codes - z).mul_(s), out=err[i]).div_(h1[i, i])
            w1[i:].addr_(h1[i, i:], e, alpha=-1)
        w[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)
    del w
    # back to the natural layout: position j of the GAR order is input perm[j], of group perm[j] // group
    natural = torch.empty_like(q)
    natural[perm] = q
    groups = perm.reshape(-1, group)[:, 0] // group
    scales[groups], zeros[groups] = scales.clone(), zeros.clone()
    g = torch.arange(k, device=q.device) // group
    dequantized = ((natural.float() - zeros[g]) * scales[g]).T.contiguous()
    return natural, zeros, scales, dequantized


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: its ModuleList as long as config.num_hidden_layers."""
    n = model.config.num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"cannot tell the decoder layers of {type(model).__name__} ({len(found)} candidates)")
    return found[0]


class _Captured(Exception):
    pass


def layer_inputs(model, layers, sequences, device) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's hidden states and keyword arguments for every calibration batch, from a forward
    pass that stops there (only what runs before the layers is loaded)."""
    captured = []

    def stop(_, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches(sequences):
            with torch.no_grad():
                try:
                    model(torch.tensor(batch, device=device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def batches(sequences: list[list[int]]) -> list[list[list[int]]]:
    """Equal-length runs of sequences, at most BATCH_TOKENS positions each (the model needs no padding then)."""
    out = []
    for s in sequences:
        if out and len(out[-1][0]) == len(s) and len(s) * (len(out[-1]) + 1) <= BATCH_TOKENS:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def linears_in_order(layer, inputs) -> list[list[str]]:
    """The layer's Linears in the order they run, grouped by the input they share (q/k/v, o, gate/up, down)."""
    order, last = [], [None, None]

    def record(name):
        def hook(_, args):
            # the same tensor object, unchanged, not just the same address: a freed input's memory is often reused
            # for the next one (o_proj's for gate_proj's on SmolLM2), which grouped gate/up with o under o's Hessian
            if args[0] is last[0] and args[0]._version == last[1]:
                order[-1].append(name)
            else:
                order.append([name])
            last[:] = args[0], args[0]._version
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)]
    hidden, kwargs = inputs[0]
    with torch.no_grad():
        layer(hidden, **kwargs)
    for h in handles:
        h.remove()
    return order


def hessians(layer, inputs, groups: list[list[str]]) -> list[torch.Tensor]:
    """H = 2/n Σ x xᵀ over the calibration positions of each group's shared input (one forward of the layer per
    batch, stopped once the last group's input is seen)."""
    modules = dict(layer.named_modules())
    sums, count = [None] * len(groups), [0] * len(groups)

    def accumulate(i):
        def hook(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[i] = x.T @ x if sums[i] is None else sums[i].addmm_(x.T, x)
            count[i] += x.shape[0]
            if i == len(groups) - 1:
                raise _Captured
        return hook

    handles = [modules[g[0]].register_forward_pre_hook(accumulate(i)) for i, g in enumerate(groups)]
    with torch.no_grad():
        for hidden, kwargs in inputs:
            try:
                layer(hidden, **kwargs)
            except _Captured:
                pass
    for h in handles:
        h.remove()
    return [s.mul_(2 / n) for s, n in zip(sums, count)]


def parts(method: str, bits: int, group: int, n: int, k: int, dtype: torch.dtype) -> list[tuple[str, object, tuple]]:
    """The tensors a packed Linear W [n, k] is stored as, with their dtypes and shapes (formats.py)."""
    g = k // group
    if method == "awq":
        return [("qweight", torch.int32, (k, n // 8)), ("qzeros", torch.int32, (g, n // 8)), ("scales", dtype, (g, n))]
    per = 32 // bits
    return [("qweight", torch.int32, (k // per, n)), ("qzeros", torch.int32, (g, n // per)),
            ("scales", dtype, (g, n)), ("g_idx", torch.int32, (k,))]


def encoded(method: str, bits: int, group: int, q, z, s, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Codes q [K, N], zero points and scales as the tensors of parts(), in its order."""
    if method == "awq":
        qweight, qzeros = awq_pack(q.cpu(), z.cpu())
        return [("qweight", qweight), ("qzeros", qzeros), ("scales", s.cpu().to(dtype))]
    qweight, qzeros = gptq_pack(q.cpu(), z.cpu(), bits)
    return [("qweight", qweight), ("qzeros", qzeros), ("scales", s.cpu().to(dtype)),
            ("g_idx", (torch.arange(q.shape[0]) // group).to(torch.int32))]


def quantization_config(method: str, bits: int, group: int, keep: tuple[str, ...]) -> dict:
    """config.json's quantization_config, as vLLM and transformers read each format (GPTQModel's and AutoAWQ's)."""
    if method == "awq":
        return awq_config(group, keep, "qlora-bridge: GPTQ, asymmetric, layer by layer")
    rule = kept_rule(keep)
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "bits": bits, "group_size": group,
            "desc_act": False, "sym": True, "lm_head": False, "pack_dtype": "int32",
            **({"dynamic": rule} if rule else {}), "quantizer": ["qlora-bridge: GPTQ, layer by layer"]}


class Skeleton:
    """The merged model's modules with their weights on the meta device: a layer's weights are read from the
    shards when it is worked on and dropped after, so one layer at a time is in memory."""

    def __init__(self, merged: Path, device: str):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .readback import Reader

        config = AutoConfig.from_pretrained(merged, trust_remote_code=False)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed as usual
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        for owner in self.model.modules():
            for name, b in list(owner.named_buffers(recurse=False)):
                owner._buffers[name] = b.to(device)
        self.device, self.reader = device, Reader(merged)
        self.layers = decoder_layers(self.model)
        self.stack = next(n for n, m in self.model.named_modules() if m is self.layers)

    def names(self, module, prefix: str) -> list[str]:
        return [f"{prefix}.{n}" for n, _ in module.named_parameters()]

    def set(self, full: str, value: torch.Tensor | None, **kwargs) -> None:
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(self.model, full, self.device if value is not None else "meta", value=value,
                                    **kwargs)

    def load(self, module, prefix: str) -> None:
        for full in self.names(module, prefix):
            self.set(full, self.reader.get(full).float())

    def drop(self, module, prefix: str) -> None:
        for full in self.names(module, prefix):
            self.set(full, None)

    def shape(self, name: str) -> tuple:
        from safetensors import safe_open

        f, key = self.reader.index[name]
        with safe_open(f, "pt") as h:
            return tuple(h.get_slice(key).get_shape())


def quantize(merged: Path, out: Path, *, method: str, bits: int, group: int, sequences: list[list[int]],
             dtype: torch.dtype, damp: float, sequential: bool, keep: tuple[str, ...], console=None) -> dict:
    """Write `method`'s checkpoint of the merged model into `out` (config, shards, index); returns the settings."""
    from tqdm import tqdm

    from qlora_bridge.api import release_freed_memory
    from qlora_bridge.api.safetensors import ShardWriter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = Skeleton(merged, device)
    writer = ShardWriter(out)
    packed, rest = plan_writes(m, writer, method, bits, group, keep, dtype)
    inputs = embedded(m, sequences)
    errors = {}
    for i, layer in enumerate(tqdm(m.layers, desc="quantizing (GPTQ, one layer at a time)", unit="layer",
                                   file=console, disable=console is None, leave=False)):
        prefix = f"{m.stack}.{i}"
        m.load(layer, prefix)
        done = quantize_layer(m, layer, prefix, inputs, packed, method=method, bits=bits, group=group, damp=damp,
                              sequential=sequential, dtype=dtype, errors=errors)
        with torch.no_grad():  # the next layer's calibration inputs, from this layer as quantized
            inputs = [(first(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        for full in m.names(layer, prefix):
            module = full.removesuffix(".weight")
            if module in done:
                for part, tensor in done.pop(module):
                    writer.write(f"{module}.{part}", tensor)
            else:
                writer.write(full, m.reader.get(full).to(dtype))
        m.drop(layer, prefix)
        release_freed_memory()
    for name in rest:
        writer.write(name, m.reader.get(name).to(dtype))
    index = writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    config_dict = json.loads((merged / "config.json").read_text())
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config_dict["quantization_config"] = quantization_config(method, bits, group, keep)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    worst = max(errors, key=errors.get)
    return {"algorithm": "gptq", "desc_act": False, "sym": method == "gptq", "damp_percent": damp,
            "true_sequential": sequential, "kept_unquantized": sorted({k.rpartition(".")[2] for k in keep}),
            "device": device, "compute_dtype": "float32", "layer_by_layer": True,
            "worst_weight_error": {worst: round(errors[worst], 5)}}


def plan_writes(m: Skeleton, writer, method: str, bits: int, group: int, keep: tuple[str, ...],
                dtype: torch.dtype) -> tuple[set[str], list[str]]:
    """The output's tensors planned in writing order: each layer's as it is finished, then those outside the
    layers. Returns the Linears to pack and the names outside the layers."""
    packed = set()
    for i, layer in enumerate(m.layers):
        for full in m.names(layer, f"{m.stack}.{i}"):
            prefix, dims = full.removesuffix(".weight"), m.shape(full)
            if full.endswith(".weight") and len(dims) == 2 and prefix not in keep:
                packed.add(prefix)
                for part, dt, shp in parts(method, bits, group, *dims, dtype):
                    writer.plan(f"{prefix}.{part}", dt, shp)
            else:
                writer.plan(full, dtype, dims)
    rest = [n for n in m.reader.index if not n.startswith(m.stack + ".")]
    for name in rest:
        writer.plan(name, dtype, m.shape(name))
    return packed, rest


def embedded(m: Skeleton, sequences: list[list[int]]) -> list[tuple[torch.Tensor, dict]]:
    """The first layer's calibration inputs. The embedding is loaded as stored, its rows cast as they are looked
    up: a float32 copy of a 128k vocabulary is 2 GiB (8B)."""
    embed = m.model.get_input_embeddings()
    embed_name = next(n for n, mod in m.model.named_modules() if mod is embed)
    table = m.reader.get(f"{embed_name}.weight")
    m.set(f"{embed_name}.weight", table, dtype=table.dtype)
    del table
    cast = embed.register_forward_hook(lambda _module, _args, out: out.float())
    inputs = layer_inputs(m.model, m.layers, sequences, m.device)
    cast.remove()
    m.drop(embed, embed_name)
    return inputs


def quantize_layer(m: Skeleton, layer, prefix: str, inputs, packed: set[str], *, method: str, bits: int, group: int,
                   damp: float, sequential: bool, dtype: torch.dtype, errors: dict) -> dict:
    """GPTQ of one layer's packed Linears, by groups that share an input (in the order they run; with
    `sequential`, each group's Hessian taken with the groups before it already quantized). The layer then
    computes with the dequantized weights. Returns each Linear's encoded tensors; `errors` gets its relative
    weight error."""
    modules = dict(layer.named_modules())
    groups = [[n for n in g if f"{prefix}.{n}" in packed] for g in linears_in_order(layer, inputs)]
    groups = [g for g in groups if g]
    done = {}
    for step in [[g] for g in groups] if sequential else [groups]:
        hs = hessians(layer, inputs, step)
        for names in step:
            factor = inverse_factor([hs.pop(0)], group, damp)  # the group's Linears share their input's
            for name in names:
                w = modules[name].weight.data
                q, z, s, deq = gptq(w, factor, bits, group, method == "gptq")
                errors[f"{prefix}.{name}"] = (torch.linalg.vector_norm(deq - w) / torch.linalg.vector_norm(w)).item()
                done[f"{prefix}.{name}"] = encoded(method, bits, group, q, z, s, dtype)
                m.set(f"{prefix}.{name}.weight", deq)
            del factor
    return done


def first(out):
    """A decoder layer's hidden states: some return them alone, some first in a tuple."""
    return out[0] if isinstance(out, tuple) else out
