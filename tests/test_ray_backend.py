"""Tests of the Ray backend of the CPU stages: the same files as the process pool, bit for bit; failed tasks retried,
then reported by image id with the finished images written; resuming; the label stages on Ray; the config fields;
Ray imported only when chosen. The tests that need Ray share one local instance of 2 CPUs (starting one takes ~6 s)."""

import functools
import importlib
import os
import subprocess
import sys
import uuid

import ml_collections
import numpy as np
import pytest

from configs import default
from puzzle_jax import cam_files, config_checks, fileio, labels, per_image, pipeline, ray_backend
from puzzle_jax.refine import cam_labels, label_folders


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    started = ray_backend.start_or_join("", num_cpus=2)
    # The workers cannot import this test module by name: its functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


def _ray(workers=2, max_retries=3):
    return per_image.HostBackend(kind="ray", workers=workers, max_retries=max_retries)


def _score_records(directory, count=5, seed=0):
    """Images with smooth blob CAMs of 1-2 classes (``hr_cam``), so that the CRF moves boundaries."""
    rng = np.random.default_rng(seed)
    height, width = 40, 56
    rows, cols = np.mgrid[:height, :width]
    records = []
    for index in range(count):
        classes = rng.choice(4, size=rng.integers(1, 3), replace=False) + 1
        maps = np.stack(
            [
                np.exp(-((rows - rng.uniform(0, height)) ** 2 + (cols - rng.uniform(0, width)) ** 2) / 200.0)
                for _ in classes
            ]
        ).astype(np.float32)
        cam_files.write_cam_file(cam_files.path_of(directory, f"im{index}"), keys=[0, *classes], hr_cam=maps)
        image = maps.max(0)[..., None] * rng.integers(60, 256, 3) + rng.integers(0, 50, (height, width, 3))
        records.append({"id": f"im{index}", "image": np.clip(image, 0, 255).astype(np.uint8)})
    return records


_AFFINITY_LABELS = functools.partial(
    cam_labels.affinity_labels_from_file, fg_threshold=0.4, bg_threshold=0.1, iterations=5
)


def _label_folder(records, score_dir, label_dir, backend):
    return label_folders.write_label_folder(
        records,
        score_dir=score_dir,
        label_dir=label_dir,
        function=_AFFINITY_LABELS,
        backend=backend,
        produced_by="infer_cam",
        description="test",
    )


def _file_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_the_crf_on_ray_writes_the_local_backends_files_bit_for_bit(tmp_path, ray_instance):
    score_dir = str(tmp_path / "cams")
    records = _score_records(score_dir)
    local = _label_folder(records, score_dir, str(tmp_path / "local"), per_image.HostBackend(workers=2))
    on_ray = _label_folder(records, score_dir, str(tmp_path / "ray"), _ray())
    assert local == on_ray == {"written": 5, "skipped_existing": 0}
    assert _file_bytes(tmp_path / "ray") == _file_bytes(tmp_path / "local")
    written = [labels.read_label_png(str(tmp_path / "ray" / f"{record['id']}.png"), 4) for record in records]
    for record, label_map in zip(records, written):
        job = (cam_files.path_of(score_dir, record["id"]), record["image"])
        np.testing.assert_array_equal(label_map, _AFFINITY_LABELS(job))
    assert all(np.isin([0, labels.IGNORE_LABEL], np.concatenate([m.ravel() for m in written])))
    assert any((label_map % 255 > 0).any() for label_map in written)  # foreground too


@pytest.mark.slow
def test_at_most_two_tasks_per_cpu_are_in_flight(tmp_path, ray_instance):
    prepared, in_flight_at_writes = [], []

    def prepare(record):
        prepared.append(record["id"])
        return record["id"], record["value"], None, str(tmp_path / "attempts")

    def write(path, result):
        in_flight_at_writes.append(len(prepared) - len(in_flight_at_writes))
        fileio.write_json(path, result)

    per_image.write_per_image(
        _records(12),
        output_path=lambda image_id: str(tmp_path / f"{image_id}.json"),
        compute=per_image.host_compute(
            _square,
            prepare=prepare,
            backend=_ray(workers=2),
        ),
        write=write,
        description="test",
    )
    assert len(in_flight_at_writes) == 12 and max(in_flight_at_writes) <= 4


# Per-image functions of the fault tests: ``(image id, value, fault, folder) -> result``; every attempt leaves a file
# ``<folder>/<id>.<random>`` so that the tests count the attempts.
def _square(job):
    image_id, value, fault, folder = job
    os.makedirs(folder, exist_ok=True)
    first_attempt = not any(name.startswith(f"{image_id}.") for name in os.listdir(folder))
    with open(os.path.join(folder, f"{image_id}.{uuid.uuid4().hex}"), "w"):
        pass
    if image_id == "img3" and (fault == "always" or (fault == "raise_once" and first_attempt)):
        raise ValueError(f"{image_id}: bad input")
    if image_id == "img3" and fault == "exit_once" and first_attempt:
        os._exit(3)  # the worker dies
    return {"square": value**2, "jax_in_worker": "jax" in sys.modules}


def _records(count):
    return [{"id": f"img{index}", "value": index} for index in range(count)]


def _attempts(folder, image_id):
    return sum(name.startswith(f"{image_id}.") for name in os.listdir(folder)) if os.path.isdir(folder) else 0


def _square_stage(tmp_path, source, *, fault=None, max_retries=3):
    attempts = str(tmp_path / "attempts")
    return per_image.write_per_image(
        source,
        output_path=lambda image_id: str(tmp_path / "out" / f"{image_id}.json"),
        compute=per_image.host_compute(
            _square,
            prepare=lambda record: (record["id"], record["value"], fault, attempts),
            backend=_ray(max_retries=max_retries),
        ),
        write=fileio.write_json,
        description="test",
    )


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise_once", "exit_once"])
def test_a_task_that_fails_once_is_retried_and_its_image_written(tmp_path, ray_instance, fault):
    assert _square_stage(tmp_path, _records(6), fault=fault, max_retries=1) == {"written": 6, "skipped_existing": 0}
    assert _attempts(str(tmp_path / "attempts"), "img3") == 2
    results = [fileio.read_json(str(tmp_path / "out" / f"img{index}.json")) for index in range(6)]
    assert [result["square"] for result in results] == [index * index for index in range(6)]
    # The workers import the per-image function's modules, never JAX.
    assert not any(result["jax_in_worker"] for result in results)


@pytest.mark.slow
def test_a_task_that_always_fails_is_reported_by_id_after_its_retries_and_the_rest_resumes(tmp_path, ray_instance):
    source = _records(8)
    failure = r"image\(s\) \['img3'\] failed on all 3 attempt"
    with pytest.raises(ray_backend.RayTaskFailedError, match=failure) as raised:
        _square_stage(tmp_path, source, fault="always", max_retries=2)
    assert raised.value.image_ids == ["img3"] and "img3: bad input" in str(raised.value)
    assert isinstance(raised.value.errors["img3"], ValueError)  # Ray's error is also the function's exception
    assert _attempts(str(tmp_path / "attempts"), "img3") == 3
    written = sorted(os.listdir(tmp_path / "out"))
    # The images submitted before the failing one are written; only complete files, none of the failed image.
    assert {"img0.json", "img1.json", "img2.json"} <= set(written) and "img3.json" not in written
    assert all(name.endswith(".json") and not name.startswith(".") for name in written)
    for name in written:
        assert fileio.read_json(str(tmp_path / "out" / name))["square"] == int(name[3:-5]) ** 2
    counts = _square_stage(tmp_path, source)
    assert counts == {"written": 8 - len(written), "skipped_existing": len(written)}
    assert fileio.read_json(str(tmp_path / "out" / "img3.json"))["square"] == 9


@pytest.mark.slow
def test_existing_outputs_are_skipped_without_a_task(tmp_path, ray_instance):
    for index in (1, 4):
        fileio.write_json(str(tmp_path / "out" / f"img{index}.json"), {"square": "old"})
    assert _square_stage(tmp_path, _records(6)) == {"written": 4, "skipped_existing": 2}
    assert fileio.read_json(str(tmp_path / "out" / "img1.json")) == {"square": "old"}
    assert [_attempts(str(tmp_path / "attempts"), f"img{index}") for index in range(6)] == [1, 0, 1, 1, 0, 1]


@pytest.mark.slow
def test_the_aff_labels_stage_on_ray_writes_the_local_backends_files(tmp_path_factory, tmp_path, ray_instance):
    from puzzle_jax.data import datasets
    from puzzle_jax.stages import aff_labels

    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=4, num_val=2))
    config.infer.split = config.eval.split = "train"
    config.eval.gallery_images = 0
    config.refine.workers = 2
    source, _ = datasets.load_split_from_config(config.data, "train")
    folders = {}
    for backend in ("local", "ray"):
        config.refine.backend = backend
        workdir = pipeline.Workdir(str(tmp_path / backend))
        for record in source:
            # Each class's mask blurred into a score map: confident inside, uncertain at the borders.
            classes = np.flatnonzero(record["labels"]) + 1
            maps = np.stack([_blurred(record["mask"] == value) for value in classes]).astype(np.float32)
            cam_files.write_cam_file(
                cam_files.path_of(workdir.cam_dir(), record["id"]), keys=[0, *classes], hr_cam=maps
            )
        summary = aff_labels.run(config, workdir)
        assert summary["written"] == 4
        folders[backend] = _file_bytes(workdir.affinity_label_dir())
    assert len(folders["ray"]) == 4 and folders["ray"] == folders["local"]


def _blurred(mask):
    blurred = mask.astype(np.float64)
    for axis in (0, 1):
        blurred = (np.roll(blurred, 2, axis) + 2 * blurred + np.roll(blurred, -2, axis)) / 4
    return blurred


@pytest.mark.slow
def test_the_segmenters_crf_on_ray_gives_the_local_labels(ray_instance):
    from puzzle_jax import seg_inference

    rng = np.random.default_rng(3)
    stream = []
    for index in range(3):
        image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        logits = rng.normal(0, 2, (30, 40, 4)).astype(np.float32)
        stream.append((f"im{index}", {"image": image, "probabilities": seg_inference.softmax(logits)}))
    results = {
        kind: dict(seg_inference.label_maps(iter(stream), crf_iterations=3, backend=backend))
        for kind, backend in (("local", per_image.HostBackend(workers=2)), ("ray", _ray()))
    }
    assert sorted(results["ray"]) == ["im0", "im1", "im2"]
    for image_id, label_map in results["ray"].items():
        assert label_map.dtype == np.uint8
        np.testing.assert_array_equal(label_map, results["local"][image_id])


class _RecordingRay:
    """Stands in for the ``ray`` module: records how it is started."""

    def __init__(self, initialized=False):
        self.initialized, self.calls = initialized, []

    def is_initialized(self):
        return self.initialized

    def init(self, **options):
        self.calls.append(options)
        self.initialized = True


@pytest.mark.parametrize(
    "address,options",
    [("", {"address": "local", "num_cpus": 3, "include_dashboard": False}), ("auto", {"address": "auto"})],
)
def test_an_empty_address_starts_a_new_instance_and_another_joins_with_the_drivers_code(monkeypatch, address, options):
    fake = _RecordingRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert ray_backend.start_or_join(address, num_cpus=3)
    # "local", not ray.init()'s default, which would join a cluster that `ray start` runs here or RAY_ADDRESS names.
    package = os.path.dirname(os.path.abspath(per_image.__file__))
    assert fake.calls == [{**options, "runtime_env": {"py_modules": [package]}}]
    # A process already connected keeps its connection, and the caller does not close it.
    assert not ray_backend.start_or_join(address, num_cpus=3) and len(fake.calls) == 1


def test_the_backend_fields_do_not_count_as_settings_of_any_stage():
    """The files are the same on either backend, so a finished or half-done stage may continue on the other."""
    config, switched = default.get_config(), default.get_config()
    switched.refine.backend, switched.refine.ray_address, switched.refine.max_retries = "ray", "auto", 0
    for stage in pipeline.STAGES:
        assert pipeline.stage_config(switched, stage) == pipeline.stage_config(config, stage), stage
    switched.refine.aff_fg_threshold = 0.5  # a setting that does change outputs
    assert pipeline.stage_config(switched, "aff_labels") != pipeline.stage_config(config, "aff_labels")


def test_the_config_names_a_bad_backend_and_a_missing_ray(monkeypatch):
    config = default.get_config()
    config.refine.backend = "dask"
    config.refine.max_retries = -1
    assert config_checks.config_problems(config) == [
        "refine.backend='dask': must be one of ['local', 'ray'].",
        "refine.max_retries=-1: must be an integer >= 0.",
    ]
    config.refine.backend, config.refine.max_retries = "ray", 3
    assert config_checks.config_problems(config) == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name))
    assert config_checks.config_problems(config) == [
        "refine.backend='ray': Ray is not installed; pip install -r requirements-ray.txt (or pip install "
        "'puzzle_jax[ray]')."
    ]
    with pytest.raises(ValueError, match=r"refine.backend must be one of \['local', 'ray'\]; got 'dask'"):
        per_image.HostBackend(kind="dask")


def test_without_ray_the_ray_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    compute = per_image.host_compute(abs, prepare=lambda record: record["value"], backend=_ray())
    with pytest.raises(ImportError, match=r"refine.backend='ray' needs Ray.*pip install -r requirements-ray.txt"):
        list(compute(iter(_records(2))))


def test_the_local_backend_and_the_label_stages_do_not_import_ray():
    program = (
        "import sys\n"
        "from puzzle_jax import per_image\n"
        "from puzzle_jax.stages import aff_labels, infer_seg, pseudo_labels\n"
        "compute = per_image.host_compute(abs, prepare=lambda record: record['value'],\n"
        "                                 backend=per_image.HostBackend(workers=1))\n"
        "assert list(compute(iter([{'id': 'a', 'value': -2}]))) == [('a', 2)]\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ray imported: False"
