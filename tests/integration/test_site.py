"""The cluster people already have, on the local cluster: users' Accelerate and Trainer(+DeepSpeed)
scripts form one world; environment modules (Lmod) and a container runtime (a stand-in `apptainer`
that records its argv and runs the command) around the launcher; a sweep as one job array and its
report; job chains (--after, --parsable), node selection (--exclude, --nodelist); a rendezvous port
taken on the head node before the job starts."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcft.distenv import rdzv_port_for
from hpcft.jobs import job_info, wait_for
from tests.integration.helpers import HPCFT, ROOT, run, submitted_job_id, write_spec

pytestmark = pytest.mark.slurm
ACCELERATE_SCRIPTS = Path(__import__("accelerate").__file__).parent / "test_utils" / "scripts"


def rank_logs(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("rank-*.log")))


# ranks per node for each script. Accelerate's test_script.py checks split_between_processes on a
# tensor with expected values written for exactly 2 processes, and runs that check whenever Accelerate
# believes the world is on one node, which on CPU (MULTI_CPU) it always does: with 4 processes it fails in
# its own expectations (so it would on one node with 4 GPUs). It runs as 2 nodes x 1 rank here.
SCRIPT_RANKS = {"test_script": 1, "test_sync": 2, "test_ops": 2, "trainer_ds": 2}


def test_users_accelerate_and_trainer_deepspeed_scripts_form_one_world(cluster, tiny_model, tmp_path):
    """Accelerate's own distributed test scripts, and a Trainer script with a DeepSpeed JSON, through
    `hpcft submit --nodes 2 --gpus-per-node G SPEC -- SCRIPT`: each forms one world of all its CPU processes."""
    jobs = {}
    for name, per_node in SCRIPT_RANKS.items():
        spec = write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name.replace("_", "-"),
                          resources={"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 2, "time": "00:15:00"})
        if name == "trainer_ds":
            command = [str(ROOT / "examples/hf_trainer_deepspeed.py"), "--model", str(tiny_model), "--deepspeed",
                       str(ROOT / "examples/ds_zero2.json"), "--out", str(tmp_path / "trainer-out")]
        else:
            command = [str(ACCELERATE_SCRIPTS / f"{name}.py")]
        proc = run([*HPCFT, "submit", "--nodes", "2", "--gpus-per-node", str(per_node), str(spec), "--", *command],
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        jobs[name] = submitted_job_id(proc.stdout)
    for name, job in jobs.items():
        info = wait_for(job, poll_s=2, timeout_s=900)
        run_dir = tmp_path / "runs" / name.replace("_", "-") / job
        logs = rank_logs(run_dir)
        assert info.state == "COMPLETED", (name, info, logs[-3000:])
        world = 2 * SCRIPT_RANKS[name]
        assert len(list(run_dir.glob("rank-*.exit.json"))) == world
        kind = "DEEPSPEED" if name == "trainer_ds" else "MULTI_CPU"
        assert f"Accelerate formed a {kind} world of {world} processes on CPU" in logs, (name, logs[-2000:])
        assert "Distributed environment: NO" not in logs
    report = json.loads((tmp_path / "trainer-out" / "report.json").read_text())
    assert report["world_size"] == 4 and report["deepspeed"] is True  # DeepSpeed really ran, not plain DDP


APPTAINER = r"""#!/bin/bash
# A stand-in for `apptainer exec [options] IMAGE COMMAND...`: records its argv, then runs COMMAND.
printf '%s\n' "$@" > "$APPTAINER_ARGV_DIR/argv-$(hostname)"
shift  # exec
while [ $# -gt 0 ]; do
  case "$1" in
    --nv) shift ;;
    --bind|-B|--pwd) shift 2 ;;
    *) break ;;
  esac
done
shift  # the image
exec "$@"
"""

MODULEFILE = """-- a module the job loads first (Lmod)
setenv("HPCFT_TEST_MODULE", "loaded")
"""


@pytest.mark.quick
def test_modules_and_a_container_runtime_around_the_launcher(cluster, tiny_model, tmp_path):
    """`launch.modules` through the real Lmod (Debian's lmod), `launch.container` with runtime apptainer
    through a stand-in that records its argv and runs the command: the job completes, the module's
    variable reached the ranks, and each node's recorded argv is what apptainer needs."""
    bin_dir, argv_dir, modules = tmp_path / "bin", tmp_path / "argv", tmp_path / "modules"
    for d in (bin_dir, argv_dir, modules / "hpcft-test"):
        d.mkdir(parents=True)
    (bin_dir / "apptainer").write_text(APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    (modules / "hpcft-test" / "1.0.lua").write_text(MODULEFILE)
    image = tmp_path / "train.sif"
    image.write_bytes(b"stand-in image")
    spec = write_spec(tmp_path, tiny_model, name="site",
                      resources={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 2, "time": "00:10:00"},
                      launch={"modules": ["hpcft-test/1.0"], "module_purge": True,
                              "setup": ['echo "module says: $HPCFT_TEST_MODULE"'],
                              "container": {"runtime": "apptainer", "image": str(image), "python": sys.executable,
                                            "mounts": [f"{ROOT}:{ROOT}"], "workdir": str(tmp_path)}},
                      train={"max_train_step": 3, "save_model": False})
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", MODULEPATH=str(modules),
               APPTAINER_ARGV_DIR=str(argv_dir))
    proc = run([*HPCFT, "submit", str(spec), "--wait"], cwd=tmp_path, env=env)
    job = submitted_job_id(proc.stdout)
    out = (tmp_path / "runs" / f"slurm-{job}.out").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + out[-3000:]
    assert "module says: loaded" in out  # Lmod ran `module load` before anything else
    recorded = {p.name: p.read_text().splitlines() for p in argv_dir.iterdir()}
    assert set(recorded) == {"argv-node1", "argv-node2"}
    for argv in recorded.values():
        image_at = argv.index(str(image))
        opts = argv[:image_at]
        assert opts[0] == "exec" and "--nv" in opts
        binds = opts[opts.index("--bind") + 1].split(",")
        assert f"{ROOT}:{ROOT}" in binds and f"{tmp_path / 'runs'}:{tmp_path / 'runs'}" in binds  # output dir added
        assert opts[opts.index("--pwd") + 1] == str(tmp_path)
        assert argv[image_at + 1:image_at + 5] == [sys.executable, "-m", "hpcft.launch", "--node"]
    summary = json.loads(next((tmp_path / "runs" / "site").glob("*/summary.json")).read_text())
    assert summary["world_size"] == 2 and summary["finished"]


def test_a_sweep_is_one_array_and_its_report_matches_the_tasks(cluster, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model, name="sweep",
                      resources={"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:10:00"},
                      train={"max_train_step": 4, "save_model": False, "val_batch_size": 32})
    proc = run([*HPCFT, "sweep", str(spec), "train.lr=1e-3,3e-3", "train.seed=1,2", "--max-parallel", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = next(line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("sweep "))
    status = run([*HPCFT, "status", job], env=dict(os.environ, COLUMNS="200"))
    assert job in status.stdout  # the array, its tasks pending or running
    for task in range(4):
        info = wait_for(f"{job}_{task}", poll_s=2, timeout_s=600)
        assert info is not None and info.state == "COMPLETED", (task, info)
    report = run([*HPCFT, "sweep-report", job, "--output-dir", str(tmp_path / "runs")], cwd=tmp_path,
                 env=dict(os.environ, COLUMNS="220"))
    assert report.returncode == 0, report.stdout + report.stderr
    dirs = sorted((tmp_path / "runs" / "sweep").glob(f"{job}_*-*"))
    assert [d.name.split("-", 1)[1] for d in dirs] == ["lr=1e-3,seed=1", "lr=1e-3,seed=2", "lr=3e-3,seed=1",
                                                      "lr=3e-3,seed=2"]
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        cfg = json.loads((d / "train_config.json").read_text())
        lr, seed = d.name.split("-", 1)[1].replace("lr=", "").replace("seed=", "").split(",")
        assert cfg["lr"] == float(lr) and cfg["seed"] == int(seed)
        task = d.name.split("-", 1)[0].split("_")[1]
        row = next(line for line in report.stdout.splitlines() if line.startswith(f"│ {task} "))
        assert f" {lr} " in row and f" {seed} " in row
        assert f"{s['eval_loss_after']:.4f}" in row and f"{s['final_train_loss']:.4f}" in row and "COMPLETED" in row
    png = tmp_path / "runs" / "sweep" / f"{job}.sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (dirs[0] / "spec.json").is_file()


def test_chains_node_selection_and_a_taken_rendezvous_port(cluster, tiny_model, tmp_path):
    """--parsable prints the id alone; --after JOB:afterany starts only after JOB; --exclude/--nodelist
    place the job; the head node's derived rendezvous port is taken before the job starts and the job
    still completes on another one (and says so)."""
    first_spec = write_spec(tmp_path, tiny_model, filename="a.yaml", name="first",
                            resources={"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:10:00"},
                            train={"max_train_step": 2, "save_model": False, "run_validation": False})
    proc = run([*HPCFT, "submit", "--parsable", "--exclude", "node1", str(first_spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.strip()
    assert first.isdigit()
    # The second job waits on a held job too, so its id is known (and its derived port taken on node1)
    # before it can start, whatever else the suite submits meanwhile.
    second_spec = write_spec(tmp_path, tiny_model, filename="b.yaml", name="second",
                             resources={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:10:00"},
                             train={"max_train_step": 2, "save_model": False, "run_validation": False})
    gate = run(["sbatch", "--parsable", "--hold", "--nodes=1", "--time=1", "--output=/dev/null", "--wrap", "true"],
               cwd=tmp_path).stdout.strip().split(";")[0]
    submitting = subprocess.Popen([*HPCFT, "submit", "--after", f"{first}:afterany", "--after", f"{gate}:afterany",
                                   "--wait", str(second_spec)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    head = []
    for line in submitting.stdout:
        head.append(line)
        if line.strip().startswith("job "):
            break
    second = submitted_job_id("".join(head))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", rdzv_port_for(second)))
        holder.listen()
        assert job_info(second).state == "PENDING"  # --after holds it
        assert run(["scontrol", "release", gate]).returncode == 0
        rest, err = submitting.communicate(timeout=900)
        proc = subprocess.CompletedProcess(submitting.args, submitting.returncode, "".join(head) + rest, err)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "job" in proc.stdout and "COMPLETED" in proc.stdout and "eval loss" in proc.stdout  # the closing table
    a, b = job_info(first), job_info(second)
    assert a.state == b.state == "COMPLETED" and a.reason == "node2"  # --exclude node1
    out = (tmp_path / "runs" / f"slurm-{second}.out").read_text()
    assert f"the job id's port {rdzv_port_for(second)} is taken on node1" in out
    starts = [json.loads(p.read_text())["started"] for p in (tmp_path / "runs" / "second" / second).glob("rank-*.exit.json")]
    ends = [json.loads(p.read_text())["ended"] for p in (tmp_path / "runs" / "first" / first).glob("rank-*.exit.json")]
    assert min(starts) >= max(ends)  # afterany: after the first one ended
    proc = run([*HPCFT, "submit", "--parsable", "--nodelist", "node2", "--after", "999999", str(first_spec)], cwd=tmp_path)
    assert proc.returncode == 2 and "--after: Slurm knows no job 999999" in proc.stderr
