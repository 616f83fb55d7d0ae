"""Hold a share of the machine's RAM in another process, as a busy workstation would.

A test fixture (``hold_memory``) and a command for trying the demo or the suite under pressure::

    python -m tests.memory_pressure 0.4 -- .venv/bin/medvlm demo

The holder allocates ``fraction`` × MemTotal (``/proc/meminfo``), writes every page so the memory
is really resident, reports ``ready`` and sleeps until it is stopped.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PAGE = 4096
_HOLDER = (
    "import sys, time\n"
    "n = int(sys.argv[1])\n"
    "buf = bytearray(n)\n"
    f"for i in range(0, n, {PAGE}):\n"
    "    buf[i] = 1\n"
    "print('ready', flush=True)\n"
    "time.sleep(86400)\n"
)


def total_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def hold_memory(fraction: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``fraction`` of the machine's RAM while the block runs."""
    size = int(total_memory_bytes() * fraction)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the memory holder could not allocate {size} bytes")
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=60)
        if holder.stdout is not None:
            holder.stdout.close()


def main(argv: list[str]) -> int:
    fraction, _, command = float(argv[0]), argv[1], argv[2:]
    with hold_memory(fraction) as holder:
        print(f"holding {resident_bytes(holder.pid) / 1024**3:.1f} GiB", file=sys.stderr)
        return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
