"""Command-line entry point: ``python -m puzzle_jax.main --config=configs/X.py [--workdir=DIR] [--config.a.b=v]``.

Runs the stages named in ``config.stages`` in order over one workdir. ``--workdir`` defaults to
``runs/<config file name>`` so that ``python -m puzzle_jax.main --config=configs/resnest101.py`` works as it is.

Exit status: 0 when every stage finished; ``PREEMPTED_EXIT_CODE`` (75) when a training stage was asked to stop
(SIGTERM, a cluster preemption) and saved a checkpoint: one line says where, and the same command resumes;
``CONFIG_ERROR_EXIT_CODE`` (2) when the config is invalid or does not match a stage's earlier outputs (nothing ran);
1 for any other failure, with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"): a job scheduler or a wrapper script
# can tell a preempted run, which resumes when restarted, from a failure (1) and from a kill by a signal (128 + N).
PREEMPTED_EXIT_CODE = 75
# What absl uses for usage errors: the command line or config is wrong, and nothing was run.
CONFIG_ERROR_EXIT_CODE = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run's artefacts (default: runs/<config file name>).")
# A multi-process run described on the command line (the names of jax.distributed.initialize's arguments); without
# them, TPU pods and Slurm jobs are detected from their environment.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator, for a multi-process run (with the next two)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "CPU devices this process exposes (a CPU-only run; default: JAX's, one)."
)


# Config fields that moved when each training stage got its own section (old -> new), so that an old command line
# gets a message naming the new field instead of ml_collections' "key not found".
_TRAINING_FIELDS = (
    "batch_size", "epochs", "learning_rate", "weight_decay", "poly_power", "nesterov", "momentum_mode", "momentum",
    "log_every_steps", "checkpoint_every_steps", "max_to_keep",
)
RENAMED_FIELDS = {
    **{f"train.{field}": f"train_cam.{field}" for field in _TRAINING_FIELDS},
    "data.train_split": "train_cam.split",
    "data.crop_size": "train_cam.crop_size (and pretrain.crop_size)",
    "data.rescale_range": "train_cam.rescale_range (and pretrain.rescale_range)",
    "model.init_from": "train_cam.init_from",
    "model.init_head": "train_cam.init_head",
}


def renamed_field_error(argv: Sequence[str]) -> str | None:
    """A message for the first ``--config.<old field>=...`` override of a field that has moved, else None."""
    for argument in argv:
        if argument.startswith("--config."):
            field = argument[len("--config.") :].split("=", 1)[0]
            if field in RENAMED_FIELDS:
                return (
                    f"--config.{field} has moved: use --config.{RENAMED_FIELDS[field]}. Each training stage has a "
                    "section of its own (config.pretrain, config.train_cam; see configs/default.py)."
                )
    return None


def default_workdir(config_path: str) -> str:
    """``configs/resnest101.py`` -> ``runs/resnest101`` (a ``:argument`` suffix of the config flag is kept)."""
    path, _, argument = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{argument}" if argument else name)


def distributed_arguments(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> dict | None:
    """``jax.distributed.initialize``'s arguments from the command line, or None when none was given.

    Raises:
      app.UsageError: some of the three flags given but not all, or inconsistent values.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if all(value is None for value in given.values()):
        return None
    missing = sorted(f"--{name}" for name, value in given.items() if value is None)
    if missing:
        raise app.UsageError(
            f"a multi-process run needs --coordinator_address, --num_processes and --process_id together; missing "
            f"{', '.join(missing)}."
        )
    if ":" not in coordinator_address:
        raise app.UsageError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.1:1234.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise app.UsageError(
            f"need --num_processes >= 1 and 0 <= --process_id < --num_processes; got --num_processes={num_processes} "
            f"--process_id={process_id}."
        )
    return given


def _initialize_distributed(arguments: dict | None, num_cpu_devices: int | None) -> None:
    """Joins a multi-process run: the one the flags describe, else the one the environment describes (TPU pods,
    Slurm); a no-op otherwise."""
    import jax

    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi_task_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if arguments is None and not (multi_host_tpu or multi_task_slurm or "JAX_COORDINATOR_ADDRESS" in os.environ):
        return
    # Collectives between the processes' CPU devices need an implementation (the default has none); gloo needs no
    # setup. The setting concerns the CPU client only, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(arguments or {}))


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
    _initialize_distributed(
        distributed_arguments(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value),
        _NUM_CPU_DEVICES.value,
    )
    enable_compilation_cache(_CONFIG.value.get("compilation_cache_dir", ""))
    # After distributed init: importing stages may touch devices.
    from puzzle_jax import config_checks, pipeline, training

    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    logging.info("Workdir: %s", os.path.abspath(workdir))
    try:
        summaries = pipeline.run_stages(_CONFIG.value, workdir)
    except config_checks.ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    except training.Preempted as stop:
        print(
            f"[{stop.description}] stopped at step {stop.step} of {stop.total_steps} (SIGTERM or preemption); "
            f"checkpoint saved in {os.path.abspath(workdir)}. Run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(PREEMPTED_EXIT_CODE)
    for name, summary in summaries.items():
        logging.info("%s: %s", name, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


if __name__ == "__main__":
    if message := renamed_field_error(sys.argv[1:]):
        sys.exit(f"error: {message}")
    app.run(main)
