"""The CAM file format: one ``<image id>.npz`` per image, the only code that writes or decodes it.

A file holds ``keys`` and one or more class-score maps of the image's ground-truth classes, each channel max-
normalised to [0, 1]:

* ``keys``: int64 ``(K + 1,)`` = ``[0, c1 + 1, ...]``: background first, then the image's classes (1-based), the
  label each channel of the maps stands for (the authors' layout, spec §5);
* ``cam``: float32 ``(K, ceil(H/4), ceil(W/4))``, the CAMs on the stride-4 grid (the random walk's input);
* ``hr_cam``: float32 ``(K, H, W)``, the CAMs at the image's resolution (``infer_cam``);
* ``rw``: float32 ``(K, H, W)``, the random walk's result (``infer_rw``).

``infer_cam`` and ``infer_rw`` write them, ``eval_cam``, ``python -m puzzle_jax.evaluate`` and the galleries read
them. Files are numpy ``.npz`` (the authors pickled torch tensors), written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from puzzle_jax import fileio

MAP_FIELDS = ("cam", "hr_cam", "rw")
# Full-resolution maps that can be scored against ground truth, in the order a reader prefers them.
SCORE_FIELDS = ("hr_cam", "rw")


def path_of(directory: str, image_id: str) -> str:
    """The CAM file of ``image_id`` in ``directory``."""
    return os.path.join(directory, f"{image_id}.npz")


def write_cam_file(path: str, *, keys: np.ndarray, **maps: np.ndarray) -> None:
    """Writes ``keys`` and the given maps (``MAP_FIELDS``) atomically.

    Raises:
      ValueError: an unknown field, or a map whose channel count differs from the classes in ``keys``.
    """
    keys = np.asarray(keys, np.int64)
    unknown = sorted(set(maps) - set(MAP_FIELDS))
    if unknown or not maps:
        raise ValueError(f"{path}: CAM files hold keys and maps among {MAP_FIELDS}; got {sorted(maps)}.")
    for field, values in maps.items():
        if np.ndim(values) != 3 or np.shape(values)[0] != len(keys) - 1:
            raise ValueError(
                f"{path}: '{field}' has shape {np.shape(values)}; expected ({len(keys) - 1}, height, width) for "
                f"keys {keys.tolist()}."
            )
    fileio.write_npz(path, keys=keys, **{field: np.asarray(values, np.float32) for field, values in maps.items()})


def read_cam_file(path: str, fields: tuple[str, ...] = ("hr_cam",)) -> dict[str, np.ndarray]:
    """Reads ``keys`` and ``fields`` of a CAM file, checked.

    Returns:
      ``{"keys": ..., field: ...}``.

    Raises:
      ValueError: the file is unreadable (truncated, empty, not an ``.npz``), lacks a field, has maps that do not
        match its keys, or holds NaN or infinite values; the message names the file.
    """
    return _read(path, lambda present: fields)


def read_score_maps(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The full-resolution maps a file offers for scoring (``hr_cam``, else ``rw``) and its keys, checked as
    ``read_cam_file`` checks them.

    Returns:
      ``(maps (K, H, W), keys (K + 1,))``.
    """

    def score_field(present):
        for field in SCORE_FIELDS:
            if field in present:
                return (field,)
        raise ValueError(f"expected 'keys' and one of {list(SCORE_FIELDS)}, found {sorted(present)}")

    contents = _read(path, score_field)
    (field,) = set(contents) - {"keys"}
    return contents[field], contents["keys"]


def _read(path: str, choose_fields) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as payload:
            fields = tuple(choose_fields(set(payload.keys())))
            missing = [field for field in ("keys", *fields) if field not in payload]
            if missing:
                raise ValueError(f"expected {['keys', *fields]}, found {sorted(payload.keys())}")
            contents = {field: np.asarray(payload[field]) for field in ("keys", *fields)}
    except Exception as error:
        # numpy and zipfile raise many types for a damaged file (BadZipFile, EOFError, zlib.error, KeyError, a
        # header's SyntaxError, ...); this reader owns the format, so every one becomes a ValueError naming the file.
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(
            f"{path}: not a readable CAM file ({reason}); it is damaged (a killed copy, a full disk): delete it and "
            "rerun the stage that wrote it."
        ) from error
    keys = contents["keys"]
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer) or len(keys) == 0 or keys[0] != 0:
        raise ValueError(f"{path}: 'keys' must be [0, class + 1, ...]; found {keys!r}.")
    for field in fields:
        values = contents[field]
        if values.ndim != 3 or values.shape[0] != len(keys) - 1:
            raise ValueError(f"{path}: '{field}' has shape {values.shape} for keys {keys.tolist()}.")
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: '{field}' holds NaN or infinite values.")
    return contents
