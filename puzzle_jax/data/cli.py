"""Command lines of the data package: check a dataset's folder, preview the demo data.

    # Prepare a dataset of downloaded data (voc_folder by default; voc2012_aug, coco2014 too) and print its splits,
    # what was skipped, and optionally write a contact sheet of the first images:
    python -m puzzle_jax.data.cli check-folder --root DIR --data_dir ~/tensorflow_datasets --preview /tmp/sheet.png
    # Generate the demo data if needed and write a contact sheet of one split:
    python -m puzzle_jax.data.cli preview-demo --preview out.png --data_dir /tmp/puzzle_demo_data

This module owns these entry points and the contact sheet they write (`render_contact_sheet`). They live apart from
the builders because they open data through `datasets`, the registry, which imports every builder: a builder
module that imported the registry back would close an import cycle.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import cv2
import numpy as np

from puzzle_jax.data import datasets, demo, voc_folder
from puzzle_jax.labels import voc_palette


def render_contact_sheet(
    records: Sequence[dict], names: Sequence[str], *, columns: int = 4, cell: int = 128
) -> np.ndarray:
    """Renders records (image, mask, labels) as a grid of image | colour-coded mask pairs.

    Args:
      records: dicts with `image` uint8 (H, W, 3), `mask` uint8 (H, W) and `labels` (C,).
      names: class names, for the caption under each pair.
      columns: pairs per row.
      cell: side of the square cell each image or mask is fitted into.

    Returns:
      uint8 RGB sheet.
    """
    palette = voc_palette()
    caption = 14
    rows = math.ceil(len(records) / columns)
    pair_gap, column_gap, row_gap = 4, 12, 4
    pair_width = 2 * cell + pair_gap + column_gap
    row_height = cell + caption + row_gap
    sheet = np.full((rows * row_height, columns * pair_width, 3), 255, np.uint8)
    for position, record in enumerate(records):
        top = (position // columns) * row_height
        left = (position % columns) * pair_width
        mask_offset = cell + pair_gap
        for offset, picture in ((0, record["image"]), (mask_offset, palette[record["mask"]])):
            height, width = picture.shape[:2]
            scale = min(1.0, cell / max(height, width))
            if scale < 1.0:
                new_size = (round(width * scale), round(height * scale))
                picture = cv2.resize(picture, new_size, interpolation=cv2.INTER_NEAREST)
            bottom, right = top + picture.shape[0], left + offset + picture.shape[1]
            sheet[top:bottom, left + offset : right] = picture
        text = ",".join(name for name, flag in zip(names, record["labels"]) if flag > 0)
        cv2.putText(
            sheet, text, (left + 2, top + cell + caption - 3), cv2.FONT_HERSHEY_SIMPLEX,
            fontScale=0.4, color=(0, 0, 0), thickness=1, lineType=cv2.LINE_AA,
        )
    return sheet


def _parse_option(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _check_folder(args: argparse.Namespace) -> None:
    """`check-folder`: prepares a dataset (voc_folder by default) and prints its splits, skips and a preview."""
    builder = datasets.create_builder(
        args.dataset, data_dir=os.path.expanduser(args.data_dir), root=args.root, **dict(args.option)
    )
    builder.download_and_prepare()
    print(f"{args.dataset} ({builder.builder_config.name}) in {builder.data_dir}")
    print(f"classes ({len(builder.class_names)}): {', '.join(builder.class_names)}")
    reports = (builder.info.metadata or {}).get("splits", {})
    for split, info in builder.info.splits.items():
        report = reports.get(split, {})
        print(
            f"  {split}: {info.num_examples} examples (listed {report.get('listed', '?')}, "
            f"skipped {report.get('skipped', '?')}, without mask "
            f"{report.get('ids_without_mask', '?')})"
        )
        for item in report.get("skipped_examples", [])[:10]:
            print(f"    skipped {item['id']}: {item['file']}: {item['problem']}")
    if args.preview:
        split = args.split or next(iter(builder.info.splits))
        source = datasets.DecodedRecords(builder.as_data_source(split))
        records = [source[index] for index in range(min(args.count, len(source)))]
        sheet = render_contact_sheet(records, builder.class_names)
        if not cv2.imwrite(args.preview, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Could not write the contact sheet to {args.preview!r}.")
        print(f"Wrote {len(records)} {split} examples to {args.preview}")


def _preview_demo(args: argparse.Namespace) -> None:
    """`preview-demo`: prepares the demo data if needed and writes a contact sheet PNG."""
    overrides = {
        field: getattr(args, field) for field in demo.CONFIG_FIELDS if getattr(args, field) is not None
    }
    source, info = datasets.load_split("puzzle_demo", args.split, data_dir=args.data_dir, **overrides)
    records = [source[index] for index in range(min(args.count, len(source)))]
    sheet = render_contact_sheet(records, info.class_names)
    if not cv2.imwrite(args.preview, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write the contact sheet to {args.preview!r}.")
    print(f"Wrote {len(records)} {args.split} examples of {info.name} to {args.preview}")


def _build_parser() -> argparse.ArgumentParser:
    """The parser of the command line: one subcommand per entry point, each with the options it had alone."""
    parser = argparse.ArgumentParser(
        prog="python -m puzzle_jax.data.cli", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check-folder",
        help="prepare a dataset of downloaded data (voc_folder by default) and report what was found and "
        "skipped, with an optional preview",
        description=voc_folder.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--root", required=True, help="folder of the data (config.data.root)")
    check.add_argument("--data_dir", required=True, help="tfds data_dir (config.data.data_dir)")
    check.add_argument("--dataset", default="voc_folder", help="voc_folder, voc2012_aug, coco2014")
    check.add_argument(
        "--option", action="append", type=_parse_option, default=[],
        help="builder option KEY=VALUE (e.g. on_bad_example=skip); repeatable",
    )
    check.add_argument("--preview", help="write a contact sheet of the first images to this PNG")
    check.add_argument("--split", help="split of the preview (default: the first)")
    check.add_argument("--count", type=int, default=16, help="images in the preview")
    check.set_defaults(run=_check_folder)
    preview = commands.add_parser(
        "preview-demo",
        help="generate the demo data if needed and write a contact sheet of one split",
        description=demo.__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    preview.add_argument("--preview", required=True, help="path of the PNG contact sheet to write")
    preview.add_argument("--data_dir", required=True, help="tfds data_dir (generated on first use)")
    preview.add_argument("--split", default="train", choices=sorted(demo.SPLIT_STREAMS))
    preview.add_argument("--count", type=int, default=16, help="number of examples shown")
    for field in demo.CONFIG_FIELDS:
        preview.add_argument(f"--{field}", type=int, default=None, help=f"demo config override: {field}")
    preview.set_defaults(run=_preview_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the subcommand named in ``argv`` (default: the process's arguments)."""
    args = _build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
