"""Tensor-at-a-time safetensors I/O with memory that does not grow with the model.

`safetensors.safe_open` memory-maps whole shards, so every tensor read stays resident and counts toward RSS until
the file is closed. `SafetensorsReader` reads one tensor's bytes with a plain read instead, and validates the
header first, so a truncated or corrupt file is named before any work starts. `ShardWriter` writes shards whose
headers are planned in advance, so tensors can be written as they are produced and then dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BridgeError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._parse()

    def _corrupt(self, what: str) -> BridgeError:
        return BridgeError(f"corrupt or truncated safetensors file: {what}", file=self.path,
                           fix="re-download or re-save this file; its digest will not match the original")

    def _parse(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise self._corrupt(f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._corrupt(f"header is not valid JSON ({e})") from None
        base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        end_of_data = base
        for name, meta in header.items():
            try:
                dtype, shape, (a, b) = DTYPES[meta["dtype"]], tuple(meta["shape"]), meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"tensor '{name}' has a malformed entry {meta}") from None
            numel = 1
            for d in shape:
                numel *= d
            if b - a != numel * dtype.itemsize or a < 0:
                raise self._corrupt(f"tensor '{name}' has offsets {a}..{b} that do not fit "
                                    f"{meta['dtype']}{list(shape)}")
            if base + b > size:
                raise self._corrupt(f"tensor '{name}' ends at byte {base + b} but the file has {size} bytes")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + a, base + b)
            end_of_data = max(end_of_data, base + b)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != info.nbytes:
                raise self._corrupt(f"tensor '{name}' could not be read in full")
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def model_shards(folder: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or the folder's safetensors files."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise BridgeError(f"malformed index ({e})", file=index, field="weight_map",
                              fix="re-save the model, or remove the index if there is one model.safetensors") from None
        missing = {f for f in weight_map.values() if not (folder / f).is_file()}
        if missing:
            raise BridgeError(f"the index names shards that are missing: {', '.join(sorted(missing))}", file=index,
                              fix="copy the missing shards into the folder")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BridgeError("no safetensors weights", file=folder,
                          fix="convert the checkpoint to safetensors; pickle checkpoints are never loaded")
    out = {}
    for f in files:
        for name in SafetensorsReader(f).tensors:
            out[name] = f
    return out


class ShardWriter:
    """Write tensors into planned safetensors shards, one tensor at a time, in plan order.

    Lifecycle: plan(name, dtype, shape) for every tensor -> write(name, tensor) in the same order -> close(),
    which returns the weight map for model.safetensors.index.json. `digests` holds each finished shard's sha256,
    hashed as it is written (re-reading a 70B merge to digest it would cost another pass over 140 GB).
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 2**30):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.bytes_written = 0
        self._planned: list[tuple[str, torch.dtype, tuple]] = []
        self._shards: list[list[tuple[str, torch.dtype, tuple]]] | None = None
        self._next = 0  # index of the next tensor to write, over all shards
        self._file = None
        self._hash = None
        self.digests: dict[str, str] = {}

    def plan(self, name: str, dtype: torch.dtype, shape) -> None:
        if self._shards is not None:
            raise RuntimeError("ShardWriter: plan() after the first write()")
        self._planned.append((name, dtype, tuple(shape)))

    def _split(self) -> list[list[tuple[str, torch.dtype, tuple]]]:
        shards, size = [[]], 0
        for entry in self._planned:
            nbytes = _numel(entry[2]) * entry[1].itemsize
            if shards[-1] and size + nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        return shards

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"

    def _open_shard(self, i: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in self._shards[i]:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
        self._file = open(self.folder / self.shard_name(i), "wb")
        self._hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(blob)) + blob)

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def _locate(self, k: int) -> tuple[int, int]:
        for i, shard in enumerate(self._shards):
            if k < len(shard):
                return i, k
            k -= len(shard)
        raise RuntimeError("ShardWriter: more tensors written than planned")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._shards is None:
            self._shards = self._split()
        shard, pos = self._locate(self._next)
        want, dtype, shape = self._shards[shard][pos]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want, dtype, shape):
            raise RuntimeError(f"ShardWriter: planned {want} {dtype}{list(shape)}, "
                               f"got {name} {tensor.dtype}{list(tensor.shape)}")
        if pos == 0:
            self._open_shard(shard)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self.bytes_written += data.nbytes
        self._next += 1
        if pos == len(self._shards[shard]) - 1:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.digests[self.shard_name(shard)] = self._hash.hexdigest()

    def close(self) -> dict[str, str]:
        if self._shards is None:
            self._shards = self._split()
        if self._next != len(self._planned):
            raise RuntimeError(f"ShardWriter closed with {len(self._planned) - self._next} tensors unwritten")
        return {name: self.shard_name(i) for i, shard in enumerate(self._shards) for name, _, _ in shard}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
