"""Tests of the progress reporter: plain lines at each tenth and after a quiet interval when not on a terminal, a tqdm
bar on one, nothing when disabled."""

import io

from puzzle_jax import progress


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_at_each_tenth_without_escape_codes():
    stream, clock = io.StringIO(), _Clock()
    with progress.Progress(50, description="infer_cam", stream=stream, clock=clock) as shown:
        for _ in range(50):
            clock.now += 1.0
            shown.update(1)
            shown.set_postfix(images_per_second="1.0")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # 5, 10, ..., 50 images: one line per tenth, the last at 100%, no extra at close
    assert lines[0] == "infer_cam: 5/50 (10%) images, 1 images/s, 5 s, images_per_second=1.0"
    assert lines[-1].startswith("infer_cam: 50/50 (100%) images")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_a_slow_tenth_still_writes_a_line_every_interval_and_close_writes_the_last_count():
    stream, clock = io.StringIO(), _Clock()
    shown = progress.Progress(
        1000, description="train_cam", unit="steps", stream=stream, clock=clock, interval_seconds=30, initial=200
    )
    for _ in range(3):
        clock.now += 31
        shown.update(1)
    clock.now += 1
    shown.update(1)  # no tenth and no interval: no line
    shown.close()
    shown.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "train_cam: 201/1000",
        "train_cam: 202/1000",
        "train_cam: 203/1000",
        "train_cam: 204/1000",
    ]
    assert "0.0323 steps/s" in lines[0] and "(20%)" in lines[0]  # the rate counts this run's steps only


def test_a_terminal_gets_a_tqdm_bar_and_disabled_progress_writes_nothing():
    stream = io.StringIO()
    items = list(progress.track(range(7), description="evaluate", stream=stream, terminal=True))
    assert items == list(range(7)) and "7/7" in stream.getvalue() and "\r" in stream.getvalue()
    quiet = io.StringIO()
    assert list(progress.track(iter(range(3)), description="x", enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    assert not progress.is_terminal(io.StringIO())
