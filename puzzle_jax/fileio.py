"""Atomic file writing: every artefact a stage leaves is either complete or absent.

A stage killed half-way must never leave a truncated file that a resumed run would take as done, so each writer
goes through a temporary file in the same folder and ``os.replace`` (atomic on POSIX).

A temporary of ``<dir>/<name>`` is ``<dir>/.<name>.tmp-<host>-<pid>``: hidden, and not ending in the output's
extension, so no reader that lists ``*.npz`` or ``*.png`` (the evaluator, a user's script) takes a killed writer's
leftover for an output. Leftovers go twice: the next write of the same path removes any temporary of it, and a
stage's next run removes every leftover of a dead writer in its output folder (``remove_leftover_temporaries``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

# The marker between an output's name and its writer in a temporary's name.
TEMPORARY_MARKER = ".tmp-"
# A temporary's name: "." + the output's name + the marker + host + "-" + pid (older versions wrote
# ".<stem>.tmp-<pid><ext>").
_TEMPORARY_NAME = re.compile(r"^\.(?P<output>.+)\.tmp-(?:(?P<host>.*)-)?(?P<pid>\d+)(?P<extension>\.[^.]*)?$")


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def is_temporary(name: str) -> bool:
    """Whether a file name is an atomic writer's temporary (a leftover if its writer is gone)."""
    return _TEMPORARY_NAME.match(os.path.basename(name)) is not None


def _temporaries_of(directory: str, name: str) -> list[str]:
    base, extension = os.path.splitext(name)
    folder = glob.escape(directory)
    return glob.glob(os.path.join(folder, f".{glob.escape(name)}{TEMPORARY_MARKER}*")) + glob.glob(
        os.path.join(folder, f".{glob.escape(base)}{TEMPORARY_MARKER}*{extension}")
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_leftover_temporaries(directory: str) -> list[str]:
    """Removes the temporaries in ``directory`` that no running writer owns; returns their paths.

    Call it before this process writes into ``directory`` (a stage's start): a temporary of this host whose writer
    process is gone (or is this process, which writes nothing there yet) is a leftover of a killed run. Temporaries of
    other hosts (a shared file system) are left to their own hosts' runs and to ``atomic_path``.
    """
    if not os.path.isdir(directory):
        return []
    host, removed = _host(), []
    for entry in os.scandir(directory):
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_exists(pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` only if the block succeeds.

    The temporary is ``.<name>.tmp-<host>-<pid>``: writers must not rely on its extension (``write_npz`` writes
    through a file handle, PIL is given the format). A temporary file of ``path`` left by a writer that was killed
    (SIGKILL leaves no chance to clean up) is removed first: one writer at a time writes a given path (stages give
    each image to one process), so any other temporary of it is such a leftover.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    for leftover in _temporaries_of(directory, name):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    temporary = os.path.join(directory, f".{name}{TEMPORARY_MARKER}{_host()}-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_text(path: str, text: str) -> None:
    """Writes ``text`` atomically."""
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)


def read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def write_rgb_png(path: str, rgb: np.ndarray) -> None:
    """Writes an ``(H, W, 3)`` uint8 RGB array as a PNG, atomically (the format is named: the temporary has no
    extension to infer it from)."""
    with atomic_path(path) as temporary:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(temporary, format="PNG")


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Writes a compressed ``.npz`` atomically (``path`` must end in ``.npz``)."""
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: an .npz output path must end in '.npz'.")
    # Through a handle: given a path without '.npz' (the temporary's), numpy would append one.
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **arrays)
