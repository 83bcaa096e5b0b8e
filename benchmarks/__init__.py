"""Benchmark tooling, outside the library: no pipeline stage imports it, and nothing under ``puzzle_jax/`` may.

Importable from the repository root (``python -m benchmarks.bench ...``): ``bench`` (our JAX step, CAM inference
and host pipeline against the authors' PyTorch computation), ``flops`` (model FLOPs from a jaxpr, for MFU),
``authors_torch`` (the one transcription of the authors' PyTorch model, optimizer and training step, which the
benchmarks time and the parity tests in ``tests/`` compare with) and ``profile_step`` (where the step's device
time goes, by kernel class, from a ``jax.profiler`` trace). The other files are scripts run by path
(``python benchmarks/end_to_end.py``); see BENCHMARKS.md.
"""
