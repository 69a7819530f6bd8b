"""`hpcft launch` inside `srun --pty bash`, run as a user runs it: under a real pseudo-terminal (script(1)),
the command typed into the interactive shell. Each launch forms one world with ranks on both hosts and
ends 0, session after session; the forms people type (--gres, --ntasks-per-node with --gpus-per-task) and
a second launch in the same shell; a failing rank ends the launch non-zero, with that rank named.
(salloc + hpcft launch, and srun from inside a step without a terminal: test_slurm_paths.py.)"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT

pytestmark = pytest.mark.slurm
SHORT = ["--max_train_step=2", "--run_validation=false", "--save_model=false", "--plot=false"]
FAIL = "import os, time\nif int(os.environ['RANK']) == 2:\n    raise ValueError('boom on rank 2')\ntime.sleep(60)"


def pty_session(tmp_path: Path, srun_args: list[str], launches: list[list[str]], tag: str) -> list[tuple[int, str]]:
    """`srun SRUN_ARGS --pty bash` under script(1); in that shell, each `hpcft launch -- ARGS` in turn, as
    typed. Returns each launch's (exit status, output)."""
    work = tmp_path / tag
    work.mkdir()
    lines = []
    for i, args in enumerate(launches):
        cmd = [sys.executable, "-m", "hpcft.cli", "launch", "--name", tag, "--output-dir", str(work / "runs"), "--",
               *args]
        lines.append(f"{shlex.join(cmd)} > {work}/launch-{i}.log 2>&1; echo $? > {work}/launch-{i}.rc")
    (work / "typed.sh").write_text("\n".join(lines) + "\n")
    srun = shlex.join(["srun", *srun_args, "--time=00:10:00", "--pty", "bash"])
    # One line, so that bash has read `exit` before the launches' srun reads the terminal.
    proc = subprocess.run(["script", "-qec", srun, "/dev/null"], input=f"bash {work}/typed.sh; exit\n",
                          capture_output=True, text=True, timeout=600, cwd=work,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [(int((work / f"launch-{i}.rc").read_text()), (work / f"launch-{i}.log").read_text())
            for i in range(len(launches))]


def run_dirs(output: str) -> Path:
    return Path(next(line for line in output.splitlines() if line.startswith("hpcft launch: run directory "))
                .split("run directory ", 1)[1])


def hosts_of_ranks(run_dir: Path) -> list[str]:
    return [json.loads(p.read_text())["host"] for p in sorted(run_dir.glob("rank-*.exit.json"))]


def train_args(tiny_model) -> list[str]:
    return ["-m", "hpcft.train", f"--model_name={tiny_model}", f"--data_path={ROOT / 'data/samsum_tiny.jsonl'}", *SHORT]


@pytest.mark.parametrize("session", [1, 2])
def test_srun_pty_two_nodes_ends_clean_session_after_session(cluster, tiny_model, tmp_path, session):
    """The form the interactive-sessions issue tried six times (none clean then): -N2 --gres=gpu:2."""
    ((rc, out),) = pty_session(tmp_path, ["-N2", "--gres=gpu:2"], [train_args(tiny_model)], f"pty{session}")
    assert rc == 0, out[-3000:]
    run_dir = run_dirs(out)
    assert hosts_of_ranks(run_dir) == ["node1", "node1", "node2", "node2"], out[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
    assert out.count("hpcft.launch: node ") == 2  # one launcher per node, never two on one
    # the store host (node1's launcher, not its torchrun agent) left last, and no agent failed at shutdown
    assert "rendezvous store closed after the other 1 node(s) left" in out, out[-3000:]
    assert "failed while shutting down" not in out and "C10d store has failed" not in out, out[-3000:]


def test_per_task_gpus_and_a_second_launch_in_the_same_shell(cluster, tiny_model, tmp_path):
    """srun -N2 --ntasks-per-node=2 --gpus-per-task=1 --pty bash: the shell holds GPU 0 of each node and its
    environment says nothing of the per-task request; each launcher still gets both GPUs of its node
    (a world of 4, not 2), and a second launch after the first ends works the same."""
    results = pty_session(tmp_path, ["-N2", "--ntasks-per-node=2", "--gpus-per-task=1"],
                          [train_args(tiny_model), train_args(tiny_model)], "pertask")
    dirs = []
    for rc, out in results:
        assert rc == 0, out[-3000:]
        dirs.append(run_dirs(out))
        assert hosts_of_ranks(dirs[-1]) == ["node1", "node1", "node2", "node2"], out[-3000:]
    assert dirs[1] == dirs[0].with_name(dirs[0].name + "-2")  # a run of its own, not a resume of the first


def test_a_failing_rank_ends_the_launch_non_zero_and_is_named(cluster, tmp_path):
    ((rc, out),) = pty_session(tmp_path, ["-N2", "--gpus-per-node=2"], [["-c", FAIL]], "fail")
    assert rc != 0
    line = next(x for x in out.splitlines() if x.startswith("hpcft launch: failed: "))
    assert line.startswith("hpcft launch: failed: rank 2 on node2 (exit code 1): ValueError: boom on rank 2; its log: ")


HOLD_THE_NODES = """srun -N2 --ntasks-per-node=1 --mem=0 --exclusive sleep 120 &
until squeue -h -s -j "$SLURM_JOB_ID" -o %j | grep -qx sleep; do sleep 0.5; done
HPCFT_STEP_WAIT_S=3 "$PY" -m hpcft.cli launch --name held --output-dir "$OUT" -- -c pass; echo "rc=$?"
kill %1"""


def test_launchers_slurm_cannot_place_are_said_in_one_line_and_nothing_starts(cluster, tmp_path):
    """Another step holds every node (all their memory, exclusively): Slurm cannot start the launchers beside
    it. Instead of a step pending silently, hpcft launch ends 2 with one line naming the step that holds them."""
    proc = subprocess.run(["salloc", "-N2", "--time=00:05:00", "bash", "-c", HOLD_THE_NODES], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "runs")))
    out = proc.stdout + proc.stderr
    assert "rc=2" in out, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("hpcft launch: error: ")]
    assert len(errors) == 1, out[-3000:]
    assert "could not place a launcher on each of the 2 node(s) within 3 s (Requested nodes are busy)" in errors[0]
    assert ".0 (sleep) hold them" in errors[0] and "(scancel " in errors[0], errors[0]
    assert not list((tmp_path / "runs").rglob("rank-*")), "no rank may start"
