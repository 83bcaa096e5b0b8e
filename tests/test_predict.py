"""Tests of ``python -m puzzle_jax.predict``: a folder of images that belong to no dataset segmented with an exported
segmenter (labels equal ``seg_inference``'s for the same options) and with a CAM classifier, resumed runs, and the
errors for unreadable images, name clashes and an export of another family."""

import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from puzzle_jax import cam_files, checkpointing, labels, models, predict, seg_inference


def _export(tmp_path, model_config, name):
    model = models.create_model(model_config, rngs=nnx.Rngs(0))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    directory = str(tmp_path / name)
    checkpointing.export_model(directory, nnx.as_pure(params), nnx.as_pure(batch_stats), model_config)
    return directory


def _image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 57, 3)).astype(np.uint8)).save(folder / "street.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 33)).astype(np.uint8)).save(folder / "grey.png")  # greyscale
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_segmenter_segments_a_folder_and_resumes(tmp_path, capsys):
    model_config = models.segmentation_config(arch="resnet_tiny", num_classes=3)
    export = _export(tmp_path, model_config, "segmenter")
    folder = _image_folder(tmp_path)
    out = str(tmp_path / "out")
    arguments = ["--model", export, "--images", str(folder), "--out", out, "--scales", "1,0.5", "--workers", "1"]
    assert predict.main(arguments) == 0
    assert sorted(os.listdir(out)) == ["grey.png", "grey_overlay.jpg", "street.png", "street_overlay.jpg"]
    model, _ = checkpointing.load_exported(export, family="segmentation")
    forward = seg_inference.create_forward(model)
    image = np.asarray(Image.open(folder / "street.jpg").convert("RGB"))
    ((_, payload),) = seg_inference.iterate_probabilities(
        forward, [("street", image)], scales=(1.0, 0.5), flip=True, pad_multiple=64, images_per_call=8
    )
    np.testing.assert_array_equal(
        labels.read_label_png(os.path.join(out, "street.png"), 2), payload["probabilities"].argmax(-1)
    )
    assert Image.open(os.path.join(out, "grey.png")).size == (33, 33)
    os.remove(os.path.join(out, "grey.png"))
    assert predict.main(arguments + ["--crf", "--crf-iterations", "2"]) == 0
    assert "1 image(s) already done" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "grey.png"))


def test_a_cam_classifier_gives_cams_and_labels(tmp_path):
    export = _export(tmp_path, models.classifier_config(arch="resnet_tiny", num_classes=2, bn_mode="global"), "cam")
    folder = _image_folder(tmp_path)
    out = str(tmp_path / "out")
    # A class threshold of 0 marks every class present, so both CAMs are computed.
    arguments = ["--model", export, "--images", str(folder / "street.jpg"), "--out", out, "--class-threshold", "0"]
    assert predict.main(arguments) == 0
    contents = cam_files.read_cam_file(os.path.join(out, "street.npz"), ("hr_cam",))
    assert list(contents["keys"]) == [0, 1, 2] and contents["hr_cam"].shape == (2, 40, 57)
    assert labels.read_label_png(os.path.join(out, "street.png"), 2).shape == (40, 57)


def test_errors_name_the_files_and_the_family(tmp_path, capsys):
    folder = _image_folder(tmp_path)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    segmenter = _export(tmp_path, models.segmentation_config(arch="resnet_tiny", num_classes=3), "segmenter")
    out = str(tmp_path / "out")
    assert predict.main(["--model", segmenter, "--images", str(folder), "--out", out]) == 2
    assert f"{folder / 'broken.jpg'}" in capsys.readouterr().err and not os.path.exists(out)
    (folder / "broken.jpg").unlink()
    Image.new("RGB", (8, 8)).save(folder / "street.png")
    assert predict.main(["--model", segmenter, "--images", str(folder), "--out", out]) == 2
    assert "street.jpg" in capsys.readouterr().err
    affinity = _export(tmp_path, models.affinity_config(arch="resnet_tiny"), "affinity")
    assert predict.main(["--model", affinity, "--images", str(folder / "grey.png"), "--out", out]) == 2
    assert "a model of the affinity family; predict takes a segmenter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--model", segmenter, "--images", str(folder), "--out", out, "--scales", "0,1"])
