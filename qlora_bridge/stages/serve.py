"""Running a serving adapter's server: free port on 127.0.0.1, log to a file, wait until ready, stop it all.

The server runs in its own process group, so stopping it stops everything it started, and asks the kernel for
SIGTERM when the process that started it dies (even by kill -9), so it cannot outlive the CLI. A server that dies
or never becomes ready is reported with the tail of its log, and nothing outlives the `with` block. Once it is up,
`failure(server)` tells a server that died (its exit code or signal) or stopped answering (stopped, then) from
one that answered an error, with the CPU flags an engine's kernels depend on and its log's last lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import manifest as mf
from ..api import LaunchRequest, Server, check_options
from ..errors import BridgeError, CheckFailed
from ..host import Registry
from ..ports import free_port


class ServerFailed(CheckFailed):
    """The server did not come up; the message carries its log's tail."""


def artifact_format(folder: Path, registry: Registry) -> str:
    """The export's format from its manifest, or, for a folder made elsewhere, the format of the first exporter that
    recognizes it (Exporter.recognizes)."""
    folder = Path(folder)
    if (folder / mf.MANIFEST).is_file():
        return mf.read(folder)["export"]["format"]
    for exporter, _ in registry.items["register_exporters"].values():
        if exporter.recognizes and exporter.recognizes(folder):
            return exporter.format
    raise BridgeError("cannot tell what this folder holds: no manifest.json, and no exporter recognizes its files",
                      file=folder, fix="pass an export folder written by `qlora-bridge export`")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_features() -> str:
    """The CPU flags engines choose kernels by (AVX2, AVX-512, AMX): what a crash report needs to name."""
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split()
    except (OSError, AttributeError):
        return "unknown"
    return " ".join(sorted({f for f in flags if re.fullmatch(r"avx2|avx512\w*|amx\w*", f)})) or "no AVX2"


def exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name} ({-code})"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


# seconds a live server may leave its ready path unanswered after a request failed before it counts as hung:
# between requests both engines answer it at once; a request still running (llama.cpp serves one at a time)
# holds it for as long as that request takes, seconds for the models a smoke test serves
HANG_WAIT = 60.0


def failure(server: Server, hang_wait: float | None = None) -> str | None:
    """None while the server is alive and answers its ready path; else what happened to it, in one report. A
    server that stays silent for `hang_wait` seconds (HANG_WAIT) is stopped and reported as hung; with 0, only
    whether it died is looked at."""
    proc = server.process
    hang_wait = HANG_WAIT if hang_wait is None else hang_wait
    deadline = time.time() + hang_wait
    while proc.poll() is None:
        if not hang_wait or _ready(server.base_url + server.adapter.ready_path):
            return None
        if time.time() >= deadline:
            _stop(proc, hung=True)
            what = f"stopped answering ({server.adapter.ready_path} unanswered for {hang_wait:.0f} s; stopped)"
            break
        time.sleep(1)
    else:
        what = f"died: {exit_status(proc.returncode)}"
    return (f"the {server.backend} server {what}; CPU flags: {cpu_features()}; last lines of {server.log}:\n"
            f"{log_tail(server.log, 15)}")


def _stop(proc: subprocess.Popen, hung: bool = False) -> None:
    if proc.poll() is not None:
        return
    # a hung (or stopped) server may never act on SIGTERM
    for sig, wait in ((signal.SIGKILL, 5),) if hung else ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def _die_with(parent: int):
    """A preexec_fn for the server: SIGTERM to it when `parent` dies (Linux's PR_SET_PDEATHSIG; elsewhere a no-op).
    Its own session keeps Ctrl-C in the terminal from reaching it directly, so the CLI's teardown stays in charge."""
    def arm():
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def serving(registry: Registry, backend: str, artifact: Path, *, log: Path, options: dict | None = None,
            timeout: float = 300.0, fmt: str | None = None):
    """The artifact served by `backend` on a free local port, for the block's duration. fmt: its format, where the
    caller has read its manifest."""
    adapter, plugin = registry.server(backend)
    artifact = Path(artifact)
    fmt = fmt or artifact_format(artifact, registry)
    if fmt not in adapter.formats:
        reason = adapter.unsupported.get(fmt, f"it serves {', '.join(adapter.formats)}")
        try:
            fix = f"serve it with --backend {registry.backend_for(fmt)}"
        except BridgeError:
            fix = "no installed backend serves this format (see `qlora-bridge plugins`)"
        raise BridgeError(f"backend '{backend}' does not serve {fmt} artifacts: {reason}", file=artifact,
                          field="--backend", fix=fix)
    check_options(options or {}, adapter.options, f"backend '{backend}'")
    port = free_port()
    argv = adapter.command(LaunchRequest(artifact=artifact, port=port, options=dict(options or {}), format=fmt))
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with(os.getpid()))
    base_url = f"http://127.0.0.1:{port}"
    try:
        while not _ready(base_url + adapter.ready_path):
            if proc.poll() is not None:
                raise ServerFailed(f"the {backend} server {exit_status(proc.returncode)} before it was ready "
                                   f"(CPU flags: {cpu_features()}); last lines of {log}:\n{log_tail(log)}",
                                   file=artifact, field="--backend", fix="read the log above")
            if time.time() - started > timeout:
                raise ServerFailed(f"the {backend} server was not ready after {timeout:.0f} s; last lines of "
                                   f"{log}:\n{log_tail(log)}", file=artifact, fix="read the log above")
            time.sleep(0.25)
        yield Server(adapter, backend, base_url, proc.pid, log, artifact, round(time.time() - started, 2), proc)
    finally:
        _stop(proc)
