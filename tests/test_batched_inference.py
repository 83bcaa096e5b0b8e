"""Tests of the batched-inference engine with a transparent network: every input reaches its image's accumulator
exactly once, in consecutive slots with its group, padded to its size bucket; calls are full-sized and rounded to
the device count; results do not depend on threads; a call in flight keeps its inputs."""

import numpy as np
import pytest

from puzzle_jax import batched_inference


def _echo(images, boxes):
    """A transparent 'network': its output is its uint8 input (as int64), so nothing is hidden from the test."""
    assert images.dtype == np.uint8 and boxes.dtype == np.int32 and len(images) == len(boxes)
    return images.astype(np.int64)


class _Collect:
    """Keeps every (outputs, input size) it is given; its result is the item and that list."""

    def __init__(self, item):
        self.item = item
        self.added = []

    def add(self, outputs, input_size):
        self.added.append((outputs.copy(), input_size))

    def result(self):
        return self.item, self.added


def _with_flips(item):
    return [(array, array[:, ::-1]) for array in item]


def _run(items, *, forward=_echo, threads=1, **overrides):
    settings = dict(group_size=2, images_per_call=2, pad_multiple=16, batch_multiple=1)
    settings.update(overrides)
    return dict(
        batched_inference.iterate_batched(
            forward, items, prepare=_with_flips, create_accumulator=_Collect, host_threads=threads, **settings
        )
    )


def _images(rng, sizes):
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in sizes]


def test_every_input_reaches_its_accumulator_once_with_its_flip_and_box():
    rng = np.random.default_rng(0)
    items = [("a", _images(rng, [(20, 30), (9, 14)])), ("b", _images(rng, [(17, 31)])), ("c", [])]
    results = _run(items)
    assert sorted(results) == ["a", "b", "c"]
    for image_id, inputs in items:
        item, added = results[image_id]
        assert item is inputs and len(added) == len(inputs)
        by_size = {input_size: pixels for pixels, input_size in added}
        for array in inputs:
            height, width = array.shape[:2]
            pixels = by_size[(height, width)]
            # Padded to the 16-multiple bucket, the image and its flip in consecutive slots.
            assert pixels.shape == (2, -(-height // 16) * 16, -(-width // 16) * 16, 3)
            np.testing.assert_array_equal(pixels[0, :height, :width], array)
            np.testing.assert_array_equal(pixels[1, :height, :width], array[:, ::-1])


def test_calls_are_batched_across_images_per_bucket_and_rounded_to_the_devices():
    calls = []

    def recording(images, boxes):
        calls.append((images.shape, boxes.copy()))
        return _echo(images, boxes)

    rng = np.random.default_rng(1)
    # Three 32x32-bucket inputs and one 16x16-bucket input; 2 inputs (4 slots) per call, rounded up to 3 devices.
    items = [(str(i), _images(rng, [(30, 30)])) for i in range(3)] + [("small", _images(rng, [(10, 12)]))]
    _run(items, forward=recording, batch_multiple=3)
    shapes = sorted(shape for shape, _ in calls)
    assert shapes == [(6, 16, 16, 3), (6, 32, 32, 3), (6, 32, 32, 3)]
    # Unused slots of a partial call have empty boxes: the device sees zeros there.
    for shape, boxes in calls:
        used = int((boxes[:, 2] > 0).sum())
        # Each input and its flip carry the input's box; the unused slots have empty boxes (zeros on the device).
        assert used in (2, 4) and not boxes[used:].any()
        expected = [0, 0, 30, 30] if shape[1] == 32 else [0, 0, 10, 12]
        np.testing.assert_array_equal(boxes[:used], [expected] * used)


def test_threads_change_nothing_and_bad_streams_are_named():
    rng = np.random.default_rng(2)
    items = [(str(i), _images(rng, [(int(rng.integers(8, 40)), int(rng.integers(8, 40)))] * 2)) for i in range(7)]
    serial, threaded = _run(items, threads=1), _run(items, threads=3)
    for image_id in serial:
        for (a, size_a), (b, size_b) in zip(serial[image_id][1], threaded[image_id][1], strict=True):
            np.testing.assert_array_equal(a, b)
            assert size_a == size_b
    with pytest.raises(ValueError, match="'x' appears twice"):
        _run([("x", items[0][1]), ("x", items[1][1])])

    def odd_groups(item):
        return [(item[0],)]

    with pytest.raises(ValueError, match="has 1 arrays, expected 2"):
        list(batched_inference.iterate_batched(
            _echo, [("y", items[0][1])], prepare=odd_groups, create_accumulator=_Collect, group_size=2,
            images_per_call=1, pad_multiple=16,
        ))


def test_a_call_in_flight_keeps_its_inputs_until_its_outputs_are_fetched():
    """The next call is dispatched before the previous call's outputs are fetched: a network that reads its inputs
    only when fetched (as a device still computing may) sees them unchanged, although buffers are reused."""

    class Lazy:
        def __init__(self, images, boxes):
            self.images, self.boxes = images, boxes  # the engine's buffers, not copies

        def __array__(self, dtype=None, copy=None):
            return self.images.astype(np.int64)

    rng = np.random.default_rng(3)
    items = [(str(i), _images(rng, [(20, 20)])) for i in range(5)]

    def collect(lazy):
        return dict(batched_inference.iterate_batched(
            lazy, items, prepare=lambda item: [(item[0],)], create_accumulator=lambda item: _Sum(),
            group_size=1, images_per_call=1, pad_multiple=16, host_threads=1,
        ))

    eager = collect(lambda images, boxes: images.astype(np.int64))
    lazy = collect(lambda images, boxes: Lazy(images, boxes))
    assert eager == lazy
    assert eager == {image_id: int(inputs[0].astype(np.int64).sum()) for image_id, inputs in items}


class _Sum:
    def __init__(self):
        self.total = 0

    def add(self, outputs, input_size):
        height, width = input_size
        self.total += int(outputs[0, :height, :width].sum())

    def result(self):
        return self.total


def test_a_pixel_budget_runs_a_huge_input_alone_with_the_same_results():
    """Issue 17: one huge image aborted the process, its bucket's batch holding images_per_call huge slots. With a
    budget, a call of a large bucket holds fewer inputs (here one), and the results are those of the unbudgeted run."""
    calls = []

    def recording(images, boxes):
        calls.append(images.shape)
        return _echo(images, boxes)

    rng = np.random.default_rng(4)
    # Two 64x64-bucket inputs ("huge"), three 16x16-bucket ones; 3 inputs (6 slots) per call without a budget.
    items = [("huge", _images(rng, [(60, 50)])), ("huge2", _images(rng, [(49, 64)]))]
    items += [(str(i), _images(rng, [(10, 12)])) for i in range(3)]
    unbudgeted = _run(items, forward=recording, images_per_call=3)
    assert sorted(calls) == [(6, 16, 16, 3), (6, 64, 64, 3)]
    calls.clear()
    # 2 slots of 64x64 = 8192 pixels: one huge input (with its flip) per call; the small ones stay 3 per call.
    budgeted = _run(items, forward=recording, images_per_call=3, max_pixels_per_call=8192)
    assert sorted(calls) == [(2, 64, 64, 3), (2, 64, 64, 3), (6, 16, 16, 3)]
    assert batched_inference.inputs_per_call((64, 64), group_size=2, images_per_call=3, max_pixels_per_call=8192) == 1
    assert batched_inference.inputs_per_call((16, 16), group_size=2, images_per_call=3, max_pixels_per_call=8192) == 3
    assert budgeted.keys() == unbudgeted.keys()
    for image_id in budgeted:
        for (a, size_a), (b, size_b) in zip(budgeted[image_id][1], unbudgeted[image_id][1], strict=True):
            np.testing.assert_array_equal(a, b)
            assert size_a == size_b
    # Rounded up to the devices: each of 4 devices still gets a slot.
    calls.clear()
    _run(items[:1], forward=recording, images_per_call=3, max_pixels_per_call=8192, batch_multiple=4)
    assert calls == [(4, 64, 64, 3)]


def test_an_input_over_the_budget_even_alone_names_the_image_and_the_field():
    rng = np.random.default_rng(5)
    items = [("fine", _images(rng, [(10, 10)])), ("IMG_6000x4000", _images(rng, [(40, 40)]))]
    expected = "'IMG_6000x4000'.*infer.max_pixels_per_call=2,000"
    with pytest.raises(batched_inference.InputOverBudgetError, match=expected):
        _run(items, max_pixels_per_call=2000)


def test_failures_inside_the_engine_name_the_image():
    rng = np.random.default_rng(6)
    items = [("good", _images(rng, [(10, 10)])), ("bad", _images(rng, [(12, 10)]))]

    def failing_prepare(item):
        if item[0].shape[0] == 12:
            raise OSError("cannot decode")
        return _with_flips(item)

    for threads in (1, 2):
        with pytest.raises(OSError, match="cannot decode") as error:
            list(batched_inference.iterate_batched(
                _echo, items, prepare=failing_prepare, create_accumulator=_Collect, group_size=2, images_per_call=1,
                pad_multiple=16, host_threads=threads,
            ))
        assert "'bad'" in "\n".join(error.value.__notes__)

    class Failing(_Collect):
        def add(self, outputs, input_size):
            if input_size == (12, 10):
                raise FloatingPointError("overflow")
            super().add(outputs, input_size)

    with pytest.raises(FloatingPointError) as error:
        list(batched_inference.iterate_batched(
            _echo, items, prepare=_with_flips, create_accumulator=Failing, group_size=2, images_per_call=1,
            pad_multiple=16, host_threads=1,
        ))
    assert "'bad'" in "\n".join(error.value.__notes__) and "'good'" not in "\n".join(error.value.__notes__)

    def out_of_memory(images, boxes):
        raise MemoryError("RESOURCE_EXHAUSTED")

    with pytest.raises(MemoryError) as error:
        _run(items, forward=out_of_memory, images_per_call=2)
    assert "'good', 'bad'" in "\n".join(error.value.__notes__)
    with pytest.raises(ValueError, match="'empty': an input of size 0x10 has no pixels"):
        _run([("empty", [np.zeros((0, 10, 3), np.uint8)])])


def test_scaled_sizes_keep_at_least_one_pixel_a_side():
    assert batched_inference.scaled_size(1, 37, 0.5) == (1, 18)
    assert batched_inference.scaled_size(3, 5, 0.1) == (1, 1)
    assert batched_inference.scaled_size(375, 500, 1.5) == (562, 750)  # round half to even, as Python's round
