"""The cluster's runtime directory: private to its user, written atomically, and the PID it names checked.

It holds HAProxy's config and admin socket, `state.json` (whose PID `cluster reload` signals) and the reload
requests (the model directory a worker will load). Anyone who could write there could make the cluster load a
model of their choosing or have `cluster reload` signal any process, so a directory that another user created
first, that a group or the world may write, or that is a symlink, is refused rather than reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


class RuntimeDirError(RuntimeError):
    """The runtime directory (or a file in it) is not private to us: refused."""


def runtime_dir_for(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vqa-async-cluster-{port}"


def _check_private(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise RuntimeDirError(f"{what} {path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}): "
                              "refusing it; remove it or choose another with --runtime-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeDirError(f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                              "refusing it; remove it or choose another with --runtime-dir")


def check_dir(path: Path) -> None:
    st = os.lstat(path)  # lstat: a symlink is judged as itself, never through its target
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is a symlink or not a directory: refusing it")
    _check_private(path, st, "runtime directory")


def prepare_dir(path: Path) -> Path:
    """Creates `path` 0700 (its parents as usual), or checks that an existing one is ours and private."""
    path = Path(os.path.abspath(path))  # absolute, without resolving a symlink at the end (checked below)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_dir(path)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a private temporary file and a rename: readers see all of it or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path) -> Any:
    """A JSON file of the runtime directory, only if it is a regular file of ours that nobody else may write."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeDirError(f"{path} is not a regular file: refusing it")
        _check_private(path, st, "file")
        return json.load(f)


def is_cluster_process(pid: int, port: int) -> bool:
    """Whether `pid` is `vqa-async cluster` on `port`: what `cluster reload` checks before it signals it."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in args if a]
    if owner != os.geteuid() or "cluster" not in words or "reload" in words:
        return False
    if not any(w.endswith("vqa-async") or w == "vqa_async.cli" for w in words):
        return False
    ports = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--port"]
    ports += [w.split("=", 1)[1] for w in words if w.startswith("--port=")]
    # Without --port, the cluster runs on its default port (8080).
    return (ports[-1] if ports else "8080") == str(port)

