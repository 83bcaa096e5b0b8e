"""Command-line entry point: ``python -m puzzle_jax.main --config=configs/X.py [--workdir=DIR] [--config.a.b=v]``.

Runs the stages named in ``config.stages`` in order over one workdir. ``--workdir`` defaults to
``runs/<config file name>`` so that ``python -m puzzle_jax.main --config=configs/resnest101.py`` works as it is.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run's artefacts (default: runs/<config file name>).")


def default_workdir(config_path: str) -> str:
    """``configs/resnest101.py`` -> ``runs/resnest101`` (a ``:argument`` suffix of the config flag is kept)."""
    path, _, argument = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{argument}" if argument else name)


def _initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (TPU pods, Slurm); a no-op otherwise."""
    import jax

    multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi_task_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if multi_host_tpu or multi_task_slurm or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


def enable_compilation_cache(directory: str) -> None:
    """Points JAX's persistent compilation cache at ``directory`` ("" leaves it off).

    Compiling a large step costs minutes on an accelerator (75-120 s for ResNeSt-101 on an H100); with the cache,
    a resumed or repeated run with the same shapes and devices loads the compiled program instead. JAX keys entries
    by the program, the devices and the compiler flags, so one folder can serve every run. Programs that compile in
    under a second are not stored (JAX's ``jax_persistent_cache_min_compile_time_secs``).
    """
    if not directory:
        return
    import jax

    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and tfds log every file they touch at INFO; keep the console to progress bars and results.
        logging.set_verbosity(logging.WARNING)
    _initialize_distributed()
    enable_compilation_cache(_CONFIG.value.get("compilation_cache_dir", ""))
    from puzzle_jax import pipeline  # After distributed init: importing stages may touch devices.

    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    logging.info("Workdir: %s", os.path.abspath(workdir))
    summaries = pipeline.run_stages(_CONFIG.value, workdir)
    for name, summary in summaries.items():
        logging.info("%s: %s", name, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


if __name__ == "__main__":
    app.run(main)
