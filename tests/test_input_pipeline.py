"""Tests for puzzle_jax.data.input_pipeline: batches, sharding, determinism and resumption.

Most tests use a fake source whose image i is a constant colour that encodes i, so the index of
every image in a batch can be read back after augmentation (a constant image stays constant under
resize, flip and crop) without trusting any of the pipeline's bookkeeping.
"""

import os

import numpy as np
import pytest

from puzzle_jax.data import datasets, input_pipeline

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
NUM_CLASSES = 4


def make_fake_source(num_records: int, side: int = 40) -> list[dict]:
    records = []
    for index in range(num_records):
        labels = np.zeros(NUM_CLASSES, np.float32)
        labels[index % NUM_CLASSES] = 1.0
        labels[(index // NUM_CLASSES) % NUM_CLASSES] = 1.0
        records.append(
            {
                "image": np.full((side, side + index % 3, 3), 10 + 3 * index, np.uint8),
                "mask": np.full((side, side + index % 3), 1 + index % NUM_CLASSES, np.uint8),
                "id": f"fake_{index}",
                "labels": labels,
            }
        )
    return records


def decode_indices(batch_images: np.ndarray) -> list[int]:
    """Reads each image's source index back from its constant colour (the loader's uint8 crops)."""
    assert batch_images.dtype == np.uint8
    indices = []
    for image_values in batch_images:
        assert np.ptp(image_values) == 0, "a constant source image must stay constant"
        indices.append((int(image_values[0, 0, 0]) - 10) // 3)
    return indices


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def loader_kwargs(**overrides):
    # Rescale long side >= 32 and crop 24: the crop always lies inside the (constant) image.
    transform = input_pipeline.ClassifierAugmentation(crop_size=24, rescale_range=(32, 40))
    kwargs = dict(transform=transform, global_batch_size=4, seed=7)
    kwargs.update(overrides)
    return kwargs


def test_batches_have_expected_shapes_dtypes_and_matching_labels():
    source = make_fake_source(12)
    batches = list(input_pipeline.create_train_loader(source, num_epochs=1, **loader_kwargs()))
    assert len(batches) == 3
    seen = []
    for batch in batches:
        assert set(batch) == {"image", "image_box", "labels"}
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
        # The crop always lies inside the image here: every box is the whole crop.
        np.testing.assert_array_equal(batch["image_box"], np.tile([0, 0, 24, 24], (4, 1)))
        assert batch["image_box"].dtype == np.int32
        assert batch["labels"].shape == (4, NUM_CLASSES) and batch["labels"].dtype == np.float32
        indices = decode_indices(batch["image"])
        for row, index in enumerate(indices):
            np.testing.assert_array_equal(batch["labels"][row], source[index]["labels"])
        seen += indices
    assert sorted(seen) == list(range(12)), "one epoch must visit every record exactly once"
    assert seen != list(range(12)), "the order must be shuffled"


def test_repeated_epochs_each_visit_every_record_once():
    source = make_fake_source(12)
    loader = input_pipeline.create_train_loader(source, num_epochs=2, **loader_kwargs())
    seen = [index for batch in loader for index in decode_indices(batch["image"])]
    assert len(seen) == 24
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))


def test_same_seed_same_stream_and_other_seed_other_stream():
    source = make_fake_source(16)

    def stream(seed):
        iterator = iter(input_pipeline.create_train_loader(source, **loader_kwargs(seed=seed)))
        return take(iterator, 6)

    first, again, other = stream(3), stream(3), stream(4)
    for batch_a, batch_b in zip(first, again):
        np.testing.assert_array_equal(batch_a["image"], batch_b["image"])
        np.testing.assert_array_equal(batch_a["labels"], batch_b["labels"])
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_two_processes_split_the_data_exactly_once_with_half_batches():
    source = make_fake_source(13)
    seen_by_process = []
    for process_index in range(2):
        loader = input_pipeline.create_train_loader(
            source, num_epochs=1, process_index=process_index, process_count=2, **loader_kwargs()
        )
        batches = list(loader)
        # 13 records -> 6 per process (the remainder is dropped so processes stay in step), 2 per
        # batch.
        assert len(batches) == 3
        assert all(batch["image"].shape[0] == 2 for batch in batches)
        seen_by_process.append([i for batch in batches for i in decode_indices(batch["image"])])
    first, second = (set(seen) for seen in seen_by_process)
    assert len(first) == 6 and len(second) == 6
    assert not first & second
    assert len(first | second) == 12 and (first | second) <= set(range(13))


def test_global_batches_and_augmentations_are_those_of_one_process_for_any_process_count(worker_count=0):
    # 14 records, global batch 4: 3 steps an epoch, so global batches straddle the epoch boundaries. (Also run with
    # grain workers by test_multiprocess_loader_visits_every_record_and_resumes_exactly.)
    source = make_fake_source(14)
    steps = 8
    single = take(iter(input_pipeline.create_train_loader(source, **loader_kwargs())), steps)
    for process_count in (1, 2) if worker_count else (2, 4):
        per_process = [
            take(
                iter(
                    input_pipeline.create_train_loader(
                        source,
                        process_index=index,
                        process_count=process_count,
                        **loader_kwargs(worker_count=worker_count),
                    )
                ),
                steps,
            )
            for index in range(process_count)
        ]
        for step in range(steps):
            for name in ("image", "image_box", "labels"):
                glued = np.concatenate([batches[step][name] for batches in per_process])
                np.testing.assert_array_equal(glued, single[step][name], err_msg=f"{process_count} processes")


def test_one_process_reads_what_grains_index_sampler_reads():
    """The sampler is grain's IndexSampler (the reference) for one process: same records, same augmentations."""
    import grain.python as grain

    source = make_fake_source(10)
    kwargs = loader_kwargs()
    reference = grain.DataLoader(
        data_source=source,
        sampler=grain.IndexSampler(num_records=10, shuffle=True, num_epochs=None, seed=kwargs["seed"]),
        operations=[kwargs["transform"], grain.Batch(batch_size=4, drop_remainder=True)],
        worker_count=0,
    )
    ours = input_pipeline.create_train_loader(source, **kwargs)
    for expected, batch in zip(take(iter(reference), 7), take(iter(ours), 7)):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["image_box"], expected["image_box"])


def test_resumed_iterator_continues_with_the_same_batches():
    source = make_fake_source(10)
    iterator = iter(input_pipeline.create_train_loader(source, **loader_kwargs()))
    take(iterator, 4)  # Crosses an epoch boundary: 10 records, 4 per batch.
    state = iterator.get_state()
    expected = take(iterator, 5)

    resumed = iter(input_pipeline.create_train_loader(source, **loader_kwargs()))
    resumed.set_state(state)
    for batch, expected_batch in zip(take(resumed, 5), expected):
        np.testing.assert_array_equal(batch["image"], expected_batch["image"])
        np.testing.assert_array_equal(batch["labels"], expected_batch["labels"])


def test_create_train_loader_rejects_bad_batch_and_process_settings():
    source = make_fake_source(8)
    with pytest.raises(ValueError, match="global_batch_size=5.*process_count=2"):
        input_pipeline.create_train_loader(
            source, process_count=2, **loader_kwargs(global_batch_size=5)
        )
    with pytest.raises(ValueError, match="process_index=2"):
        input_pipeline.create_train_loader(
            source, process_index=2, process_count=2, **loader_kwargs()
        )
    with pytest.raises(ValueError, match="8 records"):
        input_pipeline.create_train_loader(source, **loader_kwargs(global_batch_size=16))


@pytest.mark.parametrize(
    "num_examples,global_batch_size,expected",
    [(10582, 32, 330), (12, 4, 3), (13, 4, 3), (600, 16, 37)],
)
def test_steps_per_epoch_is_floor(num_examples, global_batch_size, expected):
    assert input_pipeline.steps_per_epoch(num_examples, global_batch_size) == expected


def test_steps_per_epoch_rejects_epoch_without_step():
    with pytest.raises(ValueError, match="num_examples=3.*global_batch_size=4"):
        input_pipeline.steps_per_epoch(3, 4)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_iterate_eval_covers_every_record_exactly_once_across_processes(process_count):
    source = make_fake_source(13)
    seen = []
    for process_index in range(process_count):
        for example in input_pipeline.iterate_eval(
            source, process_index=process_index, process_count=process_count
        ):
            record = source[example["index"]]
            assert example["id"] == record["id"]
            assert example["original_size"] == record["image"].shape[:2]
            assert example["image"].dtype == np.float32
            np.testing.assert_allclose(
                example["image"],
                (record["image"] / np.float32(255.0) - MEAN) / STD,
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_array_equal(example["mask"], record["mask"])
            np.testing.assert_array_equal(example["labels"], record["labels"])
            seen.append(example["id"])
    assert sorted(seen) == sorted(record["id"] for record in source)


def test_train_loader_over_the_demo_dataset(tmp_path):
    source, info = datasets.load_split(
        "puzzle_demo", "train", data_dir=str(tmp_path), num_pretrain=2, num_train=12, num_val=2
    )
    transform = input_pipeline.ClassifierAugmentation(crop_size=64, rescale_range=(48, 96))
    loader = input_pipeline.create_train_loader(
        source, transform=transform, global_batch_size=4, seed=0, num_epochs=1
    )
    batches = list(loader)
    assert len(batches) == input_pipeline.steps_per_epoch(info.num_examples, 4) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
        # Rescaled to a long side of 48-96: the image fills the crop along a side iff that side
        # reaches 64, and the canvas outside the box is zero.
        for image, (top, left, height, width) in zip(batch["image"], batch["image_box"]):
            assert 1 <= height <= 64 and 1 <= width <= 64 and max(height, width) >= 48
            assert top + height <= 64 and left + width <= 64
            outside = np.ones((64, 64), bool)
            outside[top : top + height, left : left + width] = False
            assert np.all(image[outside] == 0)
        assert batch["labels"].shape == (4, info.num_classes)
        assert np.all(batch["labels"].sum(-1) >= 1)
    all_labels = sorted(tuple(row) for batch in batches for row in batch["labels"])
    assert all_labels == sorted(tuple(record["labels"]) for record in source)


def test_segmentation_augmentation_crops_the_label_map_with_the_image():
    """Constant images with a left/right split label map: after rescale, flip and crop, the labels still sit on the
    pixels they labelled, and the canvas outside the image is 255."""
    rng = np.random.default_rng(0)
    transform = input_pipeline.SegmentationAugmentation(crop_size=48, rescale_range=(30, 70))
    for index in range(20):
        height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        image = np.zeros((height, width, 3), np.uint8)
        mask = np.zeros((height, width), np.uint8)
        image[:, : width // 2], mask[:, : width // 2] = 200, 1
        image[:, width // 2 :], mask[:, width // 2 :] = 100, 2
        record = {"image": image, "mask": mask, "labels": np.ones(2, np.float32), "id": str(index)}
        example = transform.random_map(record, np.random.default_rng(index))
        assert set(example) == {"image", "image_box", "mask", "labels"}
        assert example["mask"].shape == (48, 48) and example["mask"].dtype == np.uint8
        top, left, box_height, box_width = example["image_box"]
        inside = np.zeros((48, 48), bool)
        inside[top : top + box_height, left : left + box_width] = True
        assert np.all(example["mask"][~inside] == 255)
        # Nearest-neighbour labels and bicubic pixels agree away from the split line.
        pixels, labels = example["image"][..., 0][inside], example["mask"][inside]
        assert np.all(labels[pixels == 200] == 1) and np.all(labels[pixels == 100] == 2)
    with pytest.raises(ValueError, match="no label map"):
        transform.random_map({"image": image, "labels": np.ones(2), "id": "x"}, rng)


def test_affinity_augmentation_reduces_the_labels_to_the_stride_grid():
    transform = input_pipeline.AffinityAugmentation(crop_size=64, rescale_range=(64, 64))
    segmentation = input_pipeline.SegmentationAugmentation(crop_size=64, rescale_range=(64, 64))
    rng = np.random.default_rng(1)
    record = {
        "image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "mask": rng.integers(0, 4, (64, 64), dtype=np.uint8),
        "labels": np.ones(3, np.float32),
        "id": "a",
    }
    reduced = transform.random_map(record, np.random.default_rng(5))
    full = segmentation.random_map(record, np.random.default_rng(5))
    np.testing.assert_array_equal(reduced["image"], full["image"])
    # PIL's nearest neighbour takes the centre pixel of each 4x4 cell (offset 2), as the authors' 512 -> 128.
    np.testing.assert_array_equal(reduced["mask"], full["mask"][2::4, 2::4])
    with pytest.raises(ValueError, match="multiple of the label stride"):
        input_pipeline.AffinityAugmentation(crop_size=30, rescale_range=(30, 30))


def test_batch_spec_is_the_shape_of_the_loaders_batches():
    source = make_fake_source(8)
    for transform in (
        input_pipeline.ClassifierAugmentation(crop_size=24, rescale_range=(32, 40)),
        input_pipeline.AffinityAugmentation(crop_size=24, rescale_range=(32, 40)),
    ):
        batch = next(iter(input_pipeline.create_train_loader(source, transform=transform, global_batch_size=4, seed=0)))
        spec = input_pipeline.batch_spec(source, transform, 4)
        assert spec == {name: (value.shape, value.dtype) for name, value in batch.items()}


def test_demo_source_and_multiprocess_loader_work_in_fresh_processes(tmp_path):
    """grain workers unpickle the source in a new process; the default demo config must reopen there."""
    import pickle
    import subprocess
    import sys

    data_dir = str(tmp_path / "tfds")
    # The default sizes: the registered config, the case that failed in workers.
    source, _ = datasets.load_split("puzzle_demo", "val", data_dir=data_dir)
    path = tmp_path / "source.pickle"
    path.write_bytes(pickle.dumps(source))
    script = (
        "import pickle, sys; source = pickle.load(open(sys.argv[1], 'rb')); "
        "print(len(source), source[3]['id'], int(source[3]['image'].sum()))"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=repo, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(len(source)), source[3]["id"], str(int(source[3]["image"].sum()))]


_WORKER_LOADER_SCRIPT = """
import sys
import numpy as np
from absl import app

sys.path.insert(0, sys.argv[1])
from tests.test_input_pipeline import (
    decode_indices, loader_kwargs, make_fake_source, take,
    test_global_batches_and_augmentations_are_those_of_one_process_for_any_process_count as same_global_batches,
)
from puzzle_jax.data import input_pipeline


def main(_):
    same_global_batches(worker_count=2)
    source = make_fake_source(12)
    def loader(**kwargs):
        return input_pipeline.create_train_loader(source, worker_count=2, **loader_kwargs(), **kwargs)
    # Training repeats the data (num_epochs=None): each worker batches every 2nd element of the shuffled stream, so
    # 6 batches of 4 are exactly two epochs, every record twice. (With num_epochs=1, grain would drop each worker's
    # incomplete batch.)
    iterator = iter(loader())
    seen = [i for batch in take(iterator, 6) for i in decode_indices(batch["image"])]
    assert sorted(seen) == sorted(list(range(12)) * 2), seen
    iterator = iter(loader())
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 4)
    resumed = iter(loader())
    resumed.set_state(state)
    for batch, expected_batch in zip(take(resumed, 4), expected):
        np.testing.assert_array_equal(batch["image"], expected_batch["image"])
    print("ok")


if __name__ == "__main__":  # grain's workers import this file again
    app.run(main, argv=["worker_loader"])
"""


def test_multiprocess_loader_visits_every_record_and_resumes_exactly(tmp_path):
    """worker_count > 0 (the paper configs' default): grain worker processes, absl flags parsed as in `main`."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker_loader.py"
    script.write_text(_WORKER_LOADER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), repo], capture_output=True, text=True, cwd=repo, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


_ORPHAN_SCRIPT = """
import sys, time
from absl import app

sys.path.insert(0, sys.argv[1])
from tests.test_input_pipeline import loader_kwargs, make_fake_source
from puzzle_jax.data import input_pipeline


def main(_):
    loader = input_pipeline.create_train_loader(make_fake_source(12), worker_count=2, **loader_kwargs())
    iterator = iter(loader)
    next(iterator)
    next(iterator)  # both workers have made a batch
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    app.run(main, argv=["orphan"])
"""


def _alive(pid):
    """Whether a process exists and is not a zombie (an exited child that nobody reaped yet)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_grain_workers_die_with_a_killed_parent(tmp_path):
    """Issue 17: after kill -9 of a training stage its grain workers (and multiprocessing's resource tracker) stayed
    alive for minutes, ~270 MB each. Each worker now exits within a second or so of its parent's death."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), repo], stdout=subprocess.PIPE, text=True, cwd=repo)
    try:
        assert parent.stdout.readline().strip() == "ready"
        children = [child.pid for child in psutil.Process(parent.pid).children(recursive=True)]
        assert len(children) >= 2  # the two workers (and the resource tracker)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30  # a bound on waiting, not a timing: they go within ~1 s of polling
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:  # do not leave them behind on failure
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def test_the_parent_watch_does_nothing_in_the_main_process():
    import threading

    input_pipeline.exit_with_parent()
    assert not any(thread.name == "exit-with-parent" for thread in threading.enumerate())
