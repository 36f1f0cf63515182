"""File helpers: reading the user's text files, digests, and output folders that appear only when complete."""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from .errors import BridgeError


def cache_dir() -> Path:
    """Where what is downloaded, converted or built once is kept: $QLORA_BRIDGE_CACHE or ~/.cache/qlora-bridge."""
    return Path(os.environ.get("QLORA_BRIDGE_CACHE", Path.home() / ".cache" / "qlora-bridge"))


def read_text(path: Path, what: str) -> str:
    """A text file the user gave (a dataset, a project file, a smoke suite), decoded as UTF-8: a file in another
    encoding is a bad input that names its first undecodable line, not a decoding traceback. A leading byte-order
    mark (Windows editors and PowerShell write one) is dropped: it is UTF-8 all the same."""
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
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


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc`, or an error it was raised from, is the disk filling up. Some writers lose the errno (numpy's
    tofile, which the GGUF writer uses, raises "884736 requested and 482208 written"), so an OSError without one
    on a filesystem with less than 1 MiB left counts too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
            with contextlib.suppress(OSError):
                if exc.errno is None and shutil.disk_usage(folder).free < 1 << 20:
                    return True
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return False


HELD = "QLORA_BRIDGE_HELD_LOCKS"  # outputs this process, or the one that started it, is writing
WAIT = "QLORA_BRIDGE_WAIT"  # "1": a run that finds its output taken waits for it (--wait) instead of exiting 2


@contextlib.contextmanager
def writer_lock(out: Path, *, what: str = "output folder", wait: bool | None = None):
    """One writer per output at a time: an exclusive lock on the hidden file `.NAME.lock` beside `out`.

    A second run that wants the same output exits 2 naming the run that holds it, or waits for it: when `wait`
    says so, else when $QLORA_BRIDGE_WAIT=1 (the commands' --wait). The kernel drops the lock when its process
    dies, so a killed run never blocks the next one. Taking it again in the same process, or in a process it
    started (training's ranks), is a no-op.

        with writer_lock(out):        # first thing, before an hour of training that another run would waste
            ...
    """
    out = Path(out).resolve()
    held = [h for h in os.environ.get(HELD, "").split(os.pathsep) if h]
    if str(out) in held:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    fd = _acquire(lock, out, what, os.environ.get(WAIT) == "1" if wait is None else wait)
    os.environ[HELD] = os.pathsep.join([*held, str(out)])
    try:
        yield
    finally:
        os.environ[HELD] = os.pathsep.join(h for h in os.environ.get(HELD, "").split(os.pathsep)
                                           if h and h != str(out))
        lock.unlink(missing_ok=True)  # while still held: a run waiting on this file sees it gone and takes a new one
        os.close(fd)


def _acquire(lock: Path, out: Path, what: str, wait: bool) -> int:
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise BridgeError(f"the {what} is being written by {holder}", file=out,
                                  fix="wait for that run to finish (or stop it), or pass --wait to start when it "
                                  "has") from None
            if not told:
                print(f"waiting: the {what} {out} is being written by {holder}", file=sys.stderr, flush=True)
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # its holder finished and removed it after we opened it
            same = False
        if same:
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
            said = f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})".encode()
            os.pwrite(fd, said, 0)
            os.ftruncate(fd, len(said))  # after writing: a reader never sees it empty once it was written
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as it wrote itself into the file; a holder that has just taken it may not have written
    yet, so an empty file is read again for up to a second."""
    for _ in range(20):
        if said := os.pread(fd, 4096, 0).decode(errors="replace").strip():
            return said
        time.sleep(0.05)
    return "another run"


def check_output(out: Path, *, force: bool, what: str = "output folder", marker: str | None = None) -> None:
    """Refuse to write `out` where that would replace a file, a folder without --force, or, even with it, a folder
    this stage did not write (one without `marker`, the file the stage always writes)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BridgeError(f"the {what} would replace a file", file=out, fix="choose a folder path for --out")
    if out.exists() and not force:
        raise BridgeError(f"the {what} already exists", file=out,
                          fix="choose another folder, or pass --force to replace it")
    if out.exists() and marker and not (out / marker).is_file():
        raise BridgeError(f"--force replaces only a folder this tool wrote as the {what}, and this one has no "
                          f"{marker}",
                          file=out, fix="choose another --out, or move the folder away yourself")


@contextlib.contextmanager
def output_folder(out: Path, *, force: bool, what: str = "output folder", marker: str | None = None):
    """Yield a staging folder named like `out` inside a hidden sibling; move it to `out` only if the block succeeds.

    The whole block holds `out`'s writer_lock, and check_output runs under it, so of two runs writing the same
    folder one exits 2 (or waits) and nothing is replaced without `force`. An interrupted or failed run leaves no
    folder named `out` (a killed process may leave the hidden `.NAME.partial-PID`, which nothing mistakes for a
    result, and the next run to `out` removes it once that process is gone). The staging folder has the final
    name, so anything that records a folder's name while it is being written (a signature's subject) records the
    right one.
    """
    out = Path(out)
    with writer_lock(out, what=what):
        check_output(out, force=force, what=what, marker=marker)
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
        except Exception as e:  # the one place a full disk becomes an error that says so, whoever was writing
            if isinstance(e, BridgeError) and e.file and e.file.startswith(str(staging)):
                e.file = str(out) + e.file[len(str(staging)):]  # the folder the user named, not the hidden one
            if _disk_full(e, hidden):
                raise BridgeError(f"the disk filled up while writing the {what}; nothing was kept", file=out,
                                  fix=f"free space on that disk ({shutil.disk_usage(out.parent).total >> 20} MiB "
                                  "in all) or choose another --out") from None
            raise
        finally:
            shutil.rmtree(hidden, ignore_errors=True)


def quiet_libraries() -> None:
    """Library loggers and warnings that would reach the terminal on every start, silenced (set once per process;
    what an engine prints while it works goes to its log file: engine_log)."""
    # bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (a GPTQModel dependency, imported by transformers when present) reports its missing CUDA kernels
    # and deprecated enum registrations on every start
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    # through the environment, not by importing transformers: init, verify and plugins must not load torch
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def engine_log(path: Path | None):
    """Send whatever an engine writes to the console (llama.cpp's per-tensor notes, a C library's warnings, a
    library's loggers) to `path`, appended, for the block's duration: file descriptors 1 and 2, which native code
    and logging handlers made earlier write to, and sys.stdout/sys.stderr, which Python-level log callbacks
    (llama-cpp-python's) write to. Yields the console, the terminal's stderr as it was, for the caller's own
    progress bar. None leaves the console alone.

        with engine_log(req.log) as console:
            for layer in tqdm(layers, file=console): ...
    """
    if path is None:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a", buffering=1, errors="replace") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log), open(saved[1], "w", buffering=1, closefd=False) as console:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
