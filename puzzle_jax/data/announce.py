"""What a dataset builder says while it prepares data: our own lines instead of tfds' download banner.

tfds announces every preparation as a download ("Downloading and preparing dataset Unknown size (download: Unknown
size, ...)"), and ends with "downloaded and prepared", although the demo data is generated and a user's data is read
from a local folder; and its progress bars fill a log file with carriage returns. Builders that mix in
`AnnouncedPreparation` print one line saying what happens (generated or read, how much, where to), and one when it is
done, and show tfds' bars only on a terminal. The builder methods this overrides (`_log_download_bytes`,
`_log_download_done`) are tfds' own hooks for these messages; nothing else of tfds changes.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds

from puzzle_jax import progress


class AnnouncedPreparation:
    """Mixin for a tfds builder; subclasses define `_preparation_message`."""

    def _preparation_message(self) -> str:
        """The line printed before preparing, e.g. "Generating the demo dataset (2,000 images) into DIR ..."."""
        raise NotImplementedError

    def download_and_prepare(self, *args, **kwargs):
        if not progress.is_terminal():
            tfds.disable_progress_bar()
        return super().download_and_prepare(*args, **kwargs)

    def _log_download_bytes(self) -> None:
        print(f"{self._preparation_message()} (once: later runs read the prepared copy) ...", flush=True)

    def _log_download_done(self) -> None:
        print(
            f"Dataset {self.name} ({self.builder_config.name}) is ready in {self.data_dir}.",
            file=sys.stdout,
            flush=True,
        )
