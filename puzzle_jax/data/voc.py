"""PASCAL VOC 2012 + SBD as the tfds builder "voc2012_aug".

This module owns VOC's 20 class names (`VOC_CLASS_NAMES`, also the default classes of `voc_folder` and of
`puzzle_jax.evaluate`), where VOC 2012 and SBD put their files, the standard splits and the `train_aug` recipe. It
reads the files with `readers` and `labels.read_label_png` and builds on `manual_builder` (the `root` option, config
names, the bad-example policy); records have the layout of `records`.

Expected layout of `root` for voc2012_aug (`root` may also be `VOCdevkit/` or `VOC2012/` itself)::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/Annotations/<id>.xml              image-level labels (spec §1)
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png        fine masks of train and val
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   (+ test.txt from the test tar)
    and SBD, either
    root/benchmark_RELEASE/dataset/{cls/<id>.mat,train.txt,val.txt}   (or builder option sbd_root)
    or the widely shared SegmentationClassAug PNGs in
    root/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png  (or root/SegmentationClassAug/)

Splits: `train` (1,464) and `val` (1,449) are VOC's lists; `train_aug` is the standard recipe
(SBD train + SBD val + VOC train) - VOC val, 10,582 ids on the real data (with SegmentationClassAug
alone, its file names stand for SBD's lists); `test` (1,456, only when test.txt exists) has images
only: its labels are all 0 and its masks all 255, i.e. nothing to learn or score. Masks: VOC's fine
`SegmentationClass` mask where it exists (train, val), else SBD's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from puzzle_jax.data import manual_builder, readers
from puzzle_jax.labels import read_label_png

VOC_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# Sizes of the standard splits, to check what the user's copy gives.
VOC2012_SPLIT_SIZES: Mapping[str, int] = {
    "train_aug": 10582, "train": 1464, "val": 1449, "test": 1456
}

VOC2012_SPLITS = ("train_aug", "train", "val", "test")

_VOC_LAYOUT_HINT = (
    "ROOT/VOCdevkit/VOC2012/{JPEGImages,Annotations,SegmentationClass,ImageSets/Segmentation} and "
    "SBD as ROOT/benchmark_RELEASE/dataset/{cls,train.txt,val.txt} or "
    "ROOT/VOCdevkit/VOC2012/SegmentationClassAug/ (see puzzle_jax/data/voc.py)."
)


@dataclasses.dataclass(frozen=True)
class SbdSource:
    """Where the SBD masks come from.

    Attributes:
      kind: "mat" (benchmark_RELEASE `cls/*.mat`) or "png" (SegmentationClassAug).
      mask_dir: folder of the masks.
      list_files: SBD's train.txt and val.txt ("mat" only).
    """

    kind: str
    mask_dir: epath.Path
    list_files: tuple[epath.Path, ...] = ()

    def mask_path(self, example_id: str) -> epath.Path:
        return self.mask_dir / f"{example_id}.{self.kind}"

    def read_ids(self) -> list[str]:
        """SBD's ids: train.txt + val.txt, or the names of the SegmentationClassAug PNGs."""
        if self.kind == "mat":
            ids = [i for path in self.list_files for i in readers.read_id_list(path)]
            return list(dict.fromkeys(ids))
        ids = sorted(path.stem for path in self.mask_dir.glob("*.png"))
        if not ids:
            raise ValueError(f"SBD folder {self.mask_dir} holds no PNG mask.")
        return ids

    def identity(self) -> dict[str, Any]:
        """What identifies this source's content cheaply (lists or file names), for config names."""
        if self.kind == "mat":
            return {"kind": "mat", "lists": [manual_builder.file_digest(path) for path in self.list_files]}
        names = "\n".join(sorted(path.name for path in self.mask_dir.glob("*.png")))
        return {"kind": "png", "names": hashlib.sha256(names.encode()).hexdigest()}


def find_voc2012_dir(root: epath.Path) -> epath.Path:
    """The `VOC2012` folder: root itself, root/VOC2012 or root/VOCdevkit/VOC2012.

    Raises:
      FileNotFoundError: naming the places looked at.
    """
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        "voc2012_aug: no JPEGImages/ folder in any of "
        f"{[os.fspath(c) for c in candidates]}. Expected layout: {_VOC_LAYOUT_HINT}"
    )


def find_sbd(root: epath.Path, voc_dir: epath.Path, sbd_root: str = "") -> SbdSource | None:
    """Finds SBD: `cls/*.mat` with train.txt and val.txt, else SegmentationClassAug PNGs.

    Args:
      root: the voc2012_aug root.
      voc_dir: the VOC2012 folder.
      sbd_root: optional explicit folder (benchmark_RELEASE, its dataset/ or SegmentationClassAug).

    Returns:
      The source, or None when neither is found.
    """
    bases = [epath.Path(sbd_root)] if sbd_root else [root, voc_dir.parent, voc_dir]
    for base in bases:
        for dataset_dir in (base, base / "dataset", base / "benchmark_RELEASE" / "dataset"):
            lists = (dataset_dir / "train.txt", dataset_dir / "val.txt")
            if (dataset_dir / "cls").is_dir() and all(path.is_file() for path in lists):
                return SbdSource(kind="mat", mask_dir=dataset_dir / "cls", list_files=lists)
    if sbd_root:
        png_dirs = [epath.Path(sbd_root), epath.Path(sbd_root) / "SegmentationClassAug"]
    else:
        png_dirs = [voc_dir / "SegmentationClassAug", root / "SegmentationClassAug"]
    for png_dir in png_dirs:
        if png_dir.is_dir() and any(png_dir.glob("*.png")):
            return SbdSource(kind="png", mask_dir=png_dir)
    return None


def compose_train_aug(
    sbd_ids: Sequence[str], voc_train: Sequence[str], voc_val: Sequence[str]
) -> list[str]:
    """The standard train_aug ids: (SBD train + SBD val + VOC train) - VOC val, sorted."""
    return sorted((set(sbd_ids) | set(voc_train)) - set(voc_val))


@dataclasses.dataclass(eq=False, kw_only=True)
class Voc2012AugConfig(manual_builder.ManualDataConfig):
    """voc2012_aug options (see `create_builder`); sbd_root is "" when SBD is looked up in root."""

    sbd_root: str = ""


class Voc2012Aug(manual_builder.ManualDataBuilder):
    """PASCAL VOC 2012 segmentation with the SBD augmentation (tfds name "voc2012_aug")."""

    name = "voc2012_aug"

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # Everything is read from the root the user gives.
        config = self.builder_config
        root = epath.Path(config.root)
        voc_dir = find_voc2012_dir(root)
        lists_dir = voc_dir / "ImageSets" / "Segmentation"
        voc_lists = {
            name: readers.read_id_list(lists_dir / f"{name}.txt")
            for name in ("train", "val", "test")
            if name in config.splits or (name != "test" and "train_aug" in config.splits)
        }
        segmentation_dir = voc_dir / "SegmentationClass"
        generators = {}
        for split in config.splits:
            if split == "train_aug":
                sbd = find_sbd(root, voc_dir, config.sbd_root)
                if sbd is None:
                    raise FileNotFoundError(
                        f"voc2012_aug split 'train_aug' needs SBD, which is not in {root}"
                        + (f" nor {config.sbd_root}" if config.sbd_root else "")
                        + f". Expected layout: {_VOC_LAYOUT_HINT} Or prepare only VOC's splits "
                        "with the builder option splits='train,val'."
                    )
                ids, notes = self._train_aug_ids(sbd, voc_lists["train"], voc_lists["val"])
                fine_masks = set(voc_lists["train"])
                load = self._make_loader(voc_dir, mask_for=lambda i, s=sbd, f=fine_masks: (
                    (segmentation_dir / f"{i}.png", "png") if i in f else (s.mask_path(i), s.kind)
                ))
                source = f"{lists_dir} (train, val) and SBD in {sbd.mask_dir}"
            elif split == "test":
                ids, notes = voc_lists["test"], {"note": "images only: labels 0, masks all 255"}
                load = self._make_loader(voc_dir, mask_for=None)
                source = os.fspath(lists_dir / "test.txt")
            else:
                ids, notes = voc_lists[split], {}
                load = self._make_loader(
                    voc_dir, mask_for=lambda i: (segmentation_dir / f"{i}.png", "png")
                )
                source = os.fspath(lists_dir / f"{split}.txt")
            expected = VOC2012_SPLIT_SIZES[split]
            if len(ids) != expected:
                logging.warning(
                    "voc2012_aug split %r has %d ids; the standard split has %d.",
                    split, len(ids), expected,
                )
            generators[split] = self._generate_split(split, ids, load, source=source, notes=notes)
        return generators

    @staticmethod
    def _train_aug_ids(
        sbd: SbdSource, voc_train: Sequence[str], voc_val: Sequence[str]
    ) -> tuple[list[str], dict[str, Any]]:
        sbd_ids = sbd.read_ids()
        ids = compose_train_aug(sbd_ids, voc_train, voc_val)
        notes = {
            "recipe": "(SBD train + SBD val + VOC train) - VOC val",
            "sbd_ids": len(sbd_ids),
            "sbd_source": sbd.kind,
            "voc_train_ids": len(voc_train),
            "voc_val_ids": len(voc_val),
            "standard_size": VOC2012_SPLIT_SIZES["train_aug"],
        }
        # The count check the README asks users to look at: 10,582 on the real data.
        logging.info(
            "voc2012_aug train_aug: %d ids = (SBD %d ids (%s) + VOC train %d) - VOC val %d; the "
            "standard train_aug has %d.",
            len(ids), len(sbd_ids), sbd.kind, len(voc_train), len(voc_val),
            VOC2012_SPLIT_SIZES["train_aug"],
        )
        return ids, notes

    def _make_loader(
        self,
        voc_dir: epath.Path,
        *,
        mask_for: Callable[[str], tuple[epath.Path, str]] | None,
    ) -> Callable[[str], dict[str, Any]]:
        """Loader of one id; `mask_for(id)` gives (mask file, "png" or "mat"), None for test."""
        num_classes = len(VOC_CLASS_NAMES)

        def load(example_id: str) -> dict[str, Any]:
            image_path = voc_dir / "JPEGImages" / f"{example_id}.jpg"
            image, height, width = readers.read_image(image_path)
            if mask_for is None:
                labels = np.zeros((num_classes,), np.float32)
                mask, mask_path = None, None
            else:
                labels = readers.parse_xml_labels(
                    voc_dir / "Annotations" / f"{example_id}.xml", VOC_CLASS_NAMES
                )
                mask_path, kind = mask_for(example_id)
                reader = readers.read_sbd_mask if kind == "mat" else read_label_png
                mask = reader(mask_path, num_classes)
            return manual_builder.make_record(
                example_id, image=image, height=height, width=width, image_path=image_path,
                labels=labels, mask=mask, mask_path=mask_path,
            )

        return load


def create_builder(
    *,
    data_dir: str,
    root: str = "",
    sbd_root: str = "",
    splits: str | Sequence[str] | None = None,
    on_bad_example: str = "error",
) -> Voc2012Aug:
    """Returns the voc2012_aug builder for the user's VOC 2012 (+ SBD) copy (not prepared yet).

    Args:
      data_dir: tfds data directory where the prepared copy is kept.
      root: folder of the downloaded data (see the module docstring for the layout).
      sbd_root: SBD's folder when it is not inside root (benchmark_RELEASE, its dataset/ folder, or
        a SegmentationClassAug folder).
      splits: splits to prepare ("train_aug,train,val" or a sequence); default: train_aug, train,
        val, and test when ImageSets/Segmentation/test.txt exists.
      on_bad_example: "error" or "skip" (see manual_builder.ManualDataConfig).

    Returns:
      The builder. Its config name is `<root folder>_<hash>`, the hash covering the root path, the
      options and the split lists, so other data or options never reuse a prepared copy.

    Raises:
      ValueError, FileNotFoundError: for a missing root or VOC folder, or a bad option.
    """
    manual_builder.check_policy(
        "on_bad_example", on_bad_example, manual_builder.BAD_EXAMPLE_POLICIES, "voc2012_aug"
    )
    root_path = manual_builder.resolve_root(root, "voc2012_aug", _VOC_LAYOUT_HINT)
    voc_dir = find_voc2012_dir(root_path)
    lists_dir = voc_dir / "ImageSets" / "Segmentation"
    selected = manual_builder.parse_split_names(splits, VOC2012_SPLITS, "voc2012_aug")
    if selected is None:
        selected = ("train_aug", "train", "val")
        if (lists_dir / "test.txt").is_file():
            selected += ("test",)
    sbd_root = os.path.abspath(os.path.expanduser(sbd_root)) if sbd_root else ""
    sbd = find_sbd(root_path, voc_dir, sbd_root) if "train_aug" in selected else None
    digest = manual_builder.fingerprint({
        "root": os.fspath(root_path),
        "splits": selected,
        "on_bad_example": on_bad_example,
        "lists": {
            name: manual_builder.file_digest(lists_dir / f"{name}.txt") for name in ("train", "val", "test")
        },
        "sbd": sbd.identity() if sbd is not None else None,
    })
    config = Voc2012AugConfig(
        name=manual_builder.make_config_name(root_path, digest),
        description=f"VOC 2012 + SBD from {root_path}, splits {list(selected)}.",
        root=os.fspath(root_path),
        class_names=VOC_CLASS_NAMES,
        splits=selected,
        on_bad_example=on_bad_example,
        sbd_root=sbd_root,
    )
    return Voc2012Aug(config=config, data_dir=data_dir, file_format="array_record")
