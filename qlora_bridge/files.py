"""File helpers: reading the user's text files, digests, and output folders that appear only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import BridgeError


def read_text(path: Path, what: str) -> str:
    """A text file the user gave (a dataset, a project file, a smoke suite), decoded as UTF-8: a file in another
    encoding is a bad input that names its first undecodable line, not a decoding traceback."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BridgeError(f"the {what} is not UTF-8 text: byte {data[e.start]:#04x} on line {line} cannot be decoded",
                          file=path, field=f"line {line}",
                          fix="save the file as UTF-8 (for example `iconv -f latin1 -t utf-8 FILE > NEW`)") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_folder(folder: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every regular file directly in `folder` matching `pattern`, by relative name."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def write_json(path: Path, data) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextlib.contextmanager
def output_folder(out: Path, *, force: bool, what: str = "output folder"):
    """Yield a staging folder named like `out` inside a hidden sibling; move it to `out` only if the block succeeds.

    An interrupted or failed run leaves no folder named `out` (a killed process may leave the hidden
    `.NAME.partial-PID`, which nothing mistakes for a result, and the next run to `out` removes it once that
    process is gone). The staging folder has the final name, so anything that records a folder's name while it
    is being written (a signature's subject) records the right one.
    """
    out = Path(out)
    if out.exists() and not force:
        raise BridgeError(f"the {what} already exists", file=out,
                          fix="choose another folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by runs that were killed; never a live one's
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    hidden = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    staging = hidden / out.name
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            os.replace(out, hidden / "replaced")
        os.replace(staging, out)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)
