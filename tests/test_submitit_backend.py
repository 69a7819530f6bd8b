"""The submitit backend without a cluster: the same request as the sbatch render, the script it
prints is the one submitit writes, and NodeTask.checkpoint waits for the launcher from inside a
signal handler without deadlocking, then requeues only after a checkpointed stop."""
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import submitit

from hpcft.launch import SRUN_FLAGS
from hpcft.render import GpuRequest, render_sbatch
from hpcft.render_submitit import render_submitit, submitit_folder, submitit_parameters
from hpcft.spec import spec_from_dict
from hpcft.submitit_entry import NodeTask


@pytest.mark.parametrize("request_, sbatch, params", [
    (GpuRequest(4), "--gpus-per-node=4", {"gpus_per_node": 4}),
    (GpuRequest(8, "h100"), "--gpus-per-node=h100:8", {"gpus_per_node": "h100:8"}),
    (GpuRequest(8, "h100", as_gres=True), "--gres=gpu:h100:8", {"gres": "gpu:h100:8"}),
    (GpuRequest(2, as_gres=True), "--gres=gpu:2", {"gres": "gpu:2"}),
])
def test_gpu_request_reads_the_same_in_both_backends(request_, sbatch, params):
    assert request_.sbatch_option() == sbatch
    assert request_.submitit_parameters() == params
    spec = spec_from_dict({"output_dir": "/o", "resources": {
        "gpus_per_node": f"{request_.type}:{request_.count}" if request_.type else request_.count,
        "gres": request_.as_gres}})
    assert f"#SBATCH {sbatch}\n" in render_sbatch(spec)
    assert f"#SBATCH {sbatch}\n" in render_submitit(spec, python="python3")


def test_signal_requeue_and_srun_flags_follow_the_spec():
    spec = spec_from_dict({"output_dir": "/o", "launch": {"signal_lead_s": 75, "requeue": False}})
    params = submitit_parameters(spec)
    assert params["signal_delay_s"] == 75 and "additional_parameters" not in params
    assert params["srun_args"] == list(SRUN_FLAGS)
    text = render_submitit(spec, python="python3")
    assert "#SBATCH --signal=USR2@75\n" in text and "--requeue" not in text
    assert "#SBATCH --requeue\n" in render_submitit(spec_from_dict({"output_dir": "/o"}), python="python3")


def test_render_is_what_the_executor_would_submit(tmp_path):
    # submitit's SlurmExecutor needs srun on PATH: envs/setup.sh installs Slurm's client for every test run.
    spec = spec_from_dict({"name": "x", "output_dir": str(tmp_path / "runs"), "launch": {"setup": ["module load a"]},
                           "resources": {"nodes": 3, "gpus_per_node": "a100:4", "mem": "64G", "exclusive": True}})
    python = shlex.quote(sys.executable)
    executor = submitit.SlurmExecutor(folder=submitit_folder(spec), python=python)
    executor.update_parameters(**submitit_parameters(spec))
    expected = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert render_submitit(spec, python=python) == expected
    assert list(tmp_path.iterdir()) == []


SCENARIO = """
import pickle, signal, subprocess, sys
from hpcft.submitit_entry import NodeTask
task = NodeTask(command=["-m", "hpcft.train"], job_dir=sys.argv[1], requeue=sys.argv[2] == "1")
task._launcher = subprocess.Popen([sys.executable, "-c", sys.argv[3]])
got = []
signal.signal(signal.SIGUSR2, lambda *_: got.append(task.checkpoint()))
signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGUSR2))
signal.setitimer(signal.ITIMER_REAL, 0.2)
rc = task._launcher.wait()  # holds Popen's lock: a wait() inside checkpoint() would deadlock here
sys.stdout.buffer.write(pickle.dumps((rc, got)))
"""


def _checkpoint_from_a_signal_handler(job_dir, launcher_code: str, *, requeue: bool = True):
    """What submitit does on procid 0: its handler calls checkpoint() while the main thread waits."""
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(job_dir), "1" if requeue else "0", launcher_code],
                          capture_output=True, timeout=60, env={**os.environ, "SLURM_JOB_ID": "42"})
    assert proc.returncode == 0, proc.stderr.decode()
    return pickle.loads(proc.stdout)


def test_checkpoint_waits_for_the_launcher_then_requeues_after_a_checkpointed_stop(tmp_path):
    marker = tmp_path / "job" / "42" / "requeue"
    marker.parent.mkdir(parents=True)
    # The "launcher" writes rank 0's marker well after the signal, then exits 0.
    rc, got = _checkpoint_from_a_signal_handler(tmp_path / "job", f"import time; time.sleep(1); "
                                                                  f"open({str(marker)!r}, 'w').write('7')")
    assert rc == 0 and len(got) == 1
    delayed = got[0]
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function == NodeTask(command=["-m", "hpcft.train"], job_dir=str(tmp_path / "job"))
    assert delayed.function._launcher is None  # a fresh task: nothing of this run in the pickle
    assert not marker.exists()  # removed before the requeue, as the batch script does


@pytest.mark.parametrize("requeue, marker", [(True, False), (False, True)])
def test_no_requeue_without_a_marker_or_with_requeue_off(tmp_path, requeue, marker):
    (tmp_path / "job" / "42").mkdir(parents=True)
    if marker:
        (tmp_path / "job" / "42" / "requeue").write_text("7\n")
    rc, got = _checkpoint_from_a_signal_handler(tmp_path / "job", "import time; time.sleep(0.5)", requeue=requeue)
    assert rc == 0 and got == [None]


LATE_WARNING = """
import signal, subprocess, sys
from submitit.core.utils import UncompletedJobError
from hpcft.submitit_entry import NodeTask
task = NodeTask(command=["-m", "hpcft.train"], job_dir=sys.argv[1])
task._launcher = subprocess.Popen([sys.executable, "-c", sys.argv[2]])
def declined(*_):  # submitit's handler on procid 0 when checkpoint() finds no marker
    assert task.checkpoint() is None
    raise UncompletedJobError("Job not requeued because: checkpoint function returned None.")
signal.signal(signal.SIGUSR2, declined)
signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGUSR2))
if float(sys.argv[3]):  # a warning while the launcher still runs, as well
    signal.setitimer(signal.ITIMER_REAL, float(sys.argv[3]))
rc = task._wait_then_ignore_warnings()
print(rc, flush=True)
signal.raise_signal(signal.SIGUSR2)  # the warning once the launcher is gone, as while Python exits
"""


@pytest.mark.parametrize("warned_at", [0.2, 0.0])
def test_a_warning_after_or_while_the_launcher_ends_does_not_fail_the_task(tmp_path, warned_at):
    """A run whose last step ends at the time-limit warning: the launcher's status is the task's, and a
    warning once the launcher is gone is ignored (it used to end the task by a signal at exit, and Slurm
    failed the job after a finished run)."""
    (tmp_path / "job" / "42").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", LATE_WARNING, str(tmp_path / "job"),
                           "import time, sys; time.sleep(0.5); sys.exit(3)", str(warned_at)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_JOB_ID": "42"})
    assert (proc.returncode, proc.stdout) == (0, "3\n"), proc.stderr
