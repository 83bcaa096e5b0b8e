"""Tests for the data command lines (puzzle_jax/data/cli.py): `check-folder` and `preview-demo`."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from test_voc_folder import FakeFolder

from puzzle_jax.data import cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return FakeFolder(tmp_path_factory.mktemp("my_data"))


def test_check_command_prints_splits_and_writes_a_preview(folder, tmp_path, capsys):
    preview = tmp_path / "sheet.png"
    cli.main(["check-folder", "--root", folder.root, "--data_dir", str(tmp_path / "tfds"), "--preview",
              str(preview), "--split", "val", "--option", "on_bad_example=skip"])
    printed = capsys.readouterr().out
    assert "train: 3 examples (listed 3, skipped 0, without mask 3)" in printed
    assert "val: 2 examples" in printed and "apple, traffic light, cat" in printed
    with Image.open(preview) as sheet:
        assert sheet.size[0] > 0 and np.asarray(sheet).std() > 10


def test_preview_command_writes_contact_sheet(tmp_path):
    output = tmp_path / "sheet.png"
    data_dir = str(tmp_path / "demo_data")
    cli.main(["preview-demo", "--preview", str(output), "--data_dir", data_dir, "--seed", "3", "--count", "8",
              "--num_pretrain", "6", "--num_train", "12", "--num_val", "4"])
    sheet = cv2.imread(str(output))
    # 8 pairs in 4 columns: 2 rows of 128-pixel cells plus captions.
    assert sheet.shape[1] == 4 * (2 * 128 + 16) and sheet.shape[0] == 2 * (128 + 14 + 4)
    assert sheet.std() > 20


def test_contact_sheet_pairs_images_with_masks_in_the_voc_colours():
    image = np.full((10, 12, 3), 40, np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    mask[:5] = 1
    mask[5:] = 255
    sheet = cli.render_contact_sheet([{"image": image, "mask": mask, "labels": np.array([1.0])}], ["a"],
                                     columns=1, cell=16)
    np.testing.assert_array_equal(sheet[:10, :12], image)
    mask_left = 16 + 4
    np.testing.assert_array_equal(sheet[0, mask_left], (128, 0, 0))
    np.testing.assert_array_equal(sheet[9, mask_left], (224, 224, 192))


def test_a_subcommand_is_required_and_help_names_both(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "check-folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    printed = capsys.readouterr().out
    assert "check-folder" in printed and "preview-demo" in printed


def test_runs_as_a_module():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "puzzle_jax.data.cli", "check-folder", "--help"],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--option OPTION" in result.stdout and "Expected layout" in result.stdout
