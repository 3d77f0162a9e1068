"""Who holds a run: a holder name per process incarnation, and liveness checks.

A holder is ``<host key>/<pid>/<nonce>``. The host key distinguishes
machines *and* PID namespaces (containers share a kernel but not PIDs), so
that a rerun on the same host can tell at once that the process holding a
run is gone and take it over, instead of sitting out the lease.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid

__all__ = ["holder_is_dead", "process_holder"]

_cache: tuple[int, str] | None = None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _host_key() -> str:
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    raw = "|".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def process_holder() -> str:
    """This process's holder name (recomputed after a fork)."""
    global _cache
    pid = os.getpid()
    if _cache is None or _cache[0] != pid:
        _cache = (pid, f"{_host_key()}/{pid}/{uuid.uuid4().hex[:12]}")
    return _cache[1]


def holder_is_dead(holder: str) -> bool:
    """True only when `holder` is provably gone: same host key, and its PID has
    no live process (or a zombie), or is this very process under another nonce."""
    parts = holder.split("/")
    if len(parts) != 3 or parts[0] != _host_key() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return holder != process_holder()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = _read(f"/proc/{pid}/stat")
    # Field 3 is the state; a zombie has exited and only waits to be reaped.
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
