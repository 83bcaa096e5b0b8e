"""Atomic file writing: every artefact a stage leaves is either complete or absent.

A stage killed half-way must never leave a truncated file that a resumed run would take as done, so each writer
goes through a temporary file in the same folder and ``os.replace`` (atomic on POSIX); the next write of the same
path removes a temporary file that a killed writer left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` only if the block succeeds.

    A temporary file of ``path`` left by a writer that was killed (SIGKILL leaves no chance to clean up) is removed
    first: one writer at a time writes a given path (stages give each image to one process), so any other temporary
    of it is such a leftover.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base, extension = os.path.splitext(os.path.basename(path))
    for leftover in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.tmp-*{extension}")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    temporary = os.path.join(directory, f".{base}.tmp-{os.getpid()}{extension}")
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


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Writes a compressed ``.npz`` atomically (``path`` must end in ``.npz``)."""
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: an .npz output path must end in '.npz'.")
    with atomic_path(path) as temporary:
        np.savez_compressed(temporary, **arrays)
