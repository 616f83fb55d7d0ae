"""Prefect's temporary API servers left behind by a run that was killed.

``medvlm run`` starts Prefect's temporary ("ephemeral") API server as a child process and stops
it at exit. A run killed with SIGKILL cannot: the server lives on, orphaned, holding a port and
~150 MB. Each is recognised by its environment (``PREFECT__SERVER_EPHEMERAL=1``, set by Prefect
for exactly these servers), this user, the same ``PREFECT_HOME`` as ours, and a parent that is
no longer the Python process that started it (it was re-parented).
``stop_orphaned_prefect_servers`` ends them; ``medvlm run`` calls it before it starts its own.
Linux ``/proc`` only; elsewhere it finds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_PROC = Path("/proc")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _parent(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses; split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def _cmdline(pid: int) -> str:
    try:
        return (
            (_PROC / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
        )
    except OSError:
        return ""


def orphaned_prefect_servers(prefect_home: str | None = None) -> Iterator[int]:
    """PIDs of Prefect temporary API servers of this user (and ``PREFECT_HOME``, when given)
    whose starting process is gone."""
    if not _PROC.is_dir():
        return
    uid = os.getuid()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        env = _environ(pid)
        if env.get("PREFECT__SERVER_EPHEMERAL") != "1":
            continue
        if "prefect.server.api.server:create_app" not in _cmdline(pid):
            continue
        if prefect_home is not None and env.get("PREFECT_HOME") not in (None, prefect_home):
            continue
        if _has_live_owner(_parent(pid)):
            continue
        yield pid


def _has_live_owner(parent: int | None) -> bool:
    """Prefect's server is the child of the Python process that started it; once that is
    killed the server is re-parented to init or to a subreaper (systemd, a container's init)."""
    if parent is None or parent <= 1:
        return False
    command = _cmdline(parent)
    return any(name in command for name in ("python", "medvlm", "prefect", "pytest"))


def stop_orphaned_prefect_servers(prefect_home: str | None = None, wait_s: float = 5.0) -> int:
    """SIGTERM each orphaned temporary server (SIGKILL after ``wait_s``); how many there were."""
    pids = list(orphaned_prefect_servers(prefect_home))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait_s
    for pid in pids:
        while time.monotonic() < deadline and (_PROC / str(pid)).exists():
            time.sleep(0.1)
        if (_PROC / str(pid)).exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if pids:
        log.warning("stopped %d Prefect temporary server(s) left by a killed run", len(pids))
    return len(pids)
