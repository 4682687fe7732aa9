"""Process memory as the kernel accounts it: RSS, and PSS (shared pages divided among the processes mapping them)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def smaps_rollup(pid: int | None = None) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in bytes (Rss, Pss, Pss_File, Pss_Anon, Shared_Clean, ...)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid or os.getpid()}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def file_pss(path: str | os.PathLike[str], pid: int | None = None) -> dict[str, int]:
    """Rss and Pss of one file's mappings in a process (from /proc/PID/smaps)."""
    target = str(Path(path).resolve())
    rss = pss = 0
    current = False
    try:
        lines = Path(f"/proc/{pid or os.getpid()}/smaps").read_text().splitlines()
    except OSError:
        return {"Rss": 0, "Pss": 0}
    for line in lines:
        first = line.split(None, 1)[0]
        if not first.endswith(":"):  # a mapping header: "addr perms offset dev inode path"
            current = line.rstrip().endswith(target)
        elif current and first == "Rss:":
            rss += int(line.split()[1]) * 1024
        elif current and first == "Pss:":
            pss += int(line.split()[1]) * 1024
    return {"Rss": rss, "Pss": pss}


def memory_report(device: torch.device | None = None) -> str:
    r = smaps_rollup()
    parts = [f"rss {r.get('Rss', 0) / 2**20:.0f} MiB", f"pss {r.get('Pss', 0) / 2**20:.0f} MiB"]
    if device is not None and device.type == "cuda":
        parts.append(f"cuda allocated {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB")
    return ", ".join(parts)
