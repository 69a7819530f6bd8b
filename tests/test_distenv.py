import json
import os
import subprocess
import sys

import pytest

from hpcft.distenv import collect_dist_env, collect_slurm_env, min_tasks_per_node, plan_rendezvous, rdzv_port_for
from hpcft.hostlist import expand_hostlist
from hpcft.launch import rank_threads, srun_argv, torchrun_argv


@pytest.mark.parametrize("expr, hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b5,c[009-010]", ["a1", "a2", "b5", "c009", "c010"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("login-1.cluster", ["login-1.cluster"]),
])
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


def test_unbalanced_hostlist():
    with pytest.raises(ValueError):
        expand_hostlist("node[1-2")


BATCH = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "8"}
STEP = {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}


def test_node_launcher_in_step_on_cpu_uses_granted_gpus_as_ranks():
    s = collect_slurm_env(STEP)
    r = plan_rendezvous(s, cuda_devices=0)
    assert (r.host, r.nnodes, r.node_rank, r.nproc_per_node) == ("node1", 2, 1, 4)
    assert r.port == rdzv_port_for("4242") and r.endpoint == f"node1:{r.port}"


def test_cuda_count_wins_over_slurm_count():
    assert plan_rendezvous(collect_slurm_env(STEP), cuda_devices=8).nproc_per_node == 8


@pytest.mark.parametrize("env, count", [
    ({"SLURM_GPUS_ON_NODE": "2"}, 2),
    ({"SLURM_STEP_GPUS": "0,1,2"}, 3),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({}, 1),
])
def test_gpu_count_sources(env, count):
    base = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    assert plan_rendezvous(collect_slurm_env({**base, **env}), cuda_devices=0).nproc_per_node == count


def test_port_from_job_id_is_stable_and_in_range():
    ports = {rdzv_port_for(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 40000 for p in ports)
    assert rdzv_port_for("123_4") == rdzv_port_for("123_4")


def test_explicit_port():
    assert plan_rendezvous(collect_slurm_env(STEP), cuda_devices=0, port=31000).port == 31000


def test_not_in_allocation():
    with pytest.raises(RuntimeError, match="not inside a Slurm allocation"):
        plan_rendezvous(collect_slurm_env({}), cuda_devices=0)


def test_batch_script_is_not_a_step():
    assert not collect_slurm_env(BATCH).in_step
    assert collect_slurm_env(STEP).in_step


def test_outer_srun_overlaps_only_inside_a_step():
    inner = ["-m", "hpcft.train"]
    assert "--overlap" not in srun_argv(collect_slurm_env(BATCH), inner)
    argv = srun_argv(collect_slurm_env({**STEP, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "node1"}), inner)
    assert "--overlap" in argv and "--nodes=2" in argv and "--kill-on-bad-exit=1" in argv
    assert "--immediate=60" in argv  # a step Slurm cannot place ends (and is said) instead of pending forever
    assert argv[-3:] == ["--", "-m", "hpcft.train"]


def test_srun_stderr_is_copied_through_and_a_refused_step_found():
    import io

    from hpcft.launch import STEP_REFUSED, copy_watching

    text = (b"hpcft.launch: node 0/2 ...\nsrun: error: Unable to create step for job 7: Requested nodes are busy\n"
            b"srun: error: Unable to create step for job 7: again\n\xff tail")
    sink = io.BytesIO()
    assert copy_watching(io.BytesIO(text), sink, STEP_REFUSED) == \
        "srun: error: Unable to create step for job 7: Requested nodes are busy"
    assert sink.getvalue() == text
    assert copy_watching(io.BytesIO(b"all fine\n"), io.BytesIO(), STEP_REFUSED) is None


def test_torchrun_argv():
    r = plan_rendezvous(collect_slurm_env(STEP), cuda_devices=0)
    argv = torchrun_argv(r, ["-m", "hpcft.train", "--lr=1"], python="py")
    assert argv[:3] == ["py", "-m", "torch.distributed.run"]
    assert ["--rdzv-backend", "c10d"] == argv[argv.index("--rdzv-backend"):argv.index("--rdzv-backend") + 2]
    assert argv[-5:] == ["-m", "hpcft.rankrun", "-m", "hpcft.train", "--lr=1"]
    assert "--rdzv-conf" not in argv  # torchrun's own agent on the head node hosts the store
    hosted = torchrun_argv(r, ["-m", "hpcft.train"], python="py", store_hosted=True)
    assert hosted[hosted.index("--rdzv-conf") + 1] == "is_host=false"  # every agent a client of the launcher's


def test_the_head_nodes_launcher_hosts_the_store_and_leaves_after_the_others(tmp_path, monkeypatch, capsys):
    """hpcft.launch.run_node with store_hosted: the head node's launcher serves the rendezvous store torchrun's
    agents connect to, the other nodes say when their torchrun exited, and the head node waits for them."""
    import dataclasses
    import datetime

    from torch.distributed import TCPStore

    from hpcft import rdzvstore
    from hpcft.distenv import Rendezvous
    from hpcft.launch import leave_in_order
    from hpcft.network import pick_port
    from hpcft.paths import RunPaths

    assert rdzvstore.hosted(2, str(tmp_path)) and not rdzvstore.hosted(1, str(tmp_path))
    assert not rdzvstore.hosted(2, None)
    port = pick_port(29500 + os.getpid() % 1000)
    store = rdzvstore.open_store(port)
    agent = TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
    agent.set("rdzv", "x")  # a client (an agent with is_host=false) reaches it
    assert store.get("rdzv") == b"x"

    paths, key = RunPaths(tmp_path), "7-0-1"
    head = Rendezvous(host="node1", port=port, run_id="r", nnodes=3, node_rank=0, nproc_per_node=2)
    monkeypatch.setattr(rdzvstore, "LEAVE_WAIT_S", 0.5)
    leave_in_order(paths, key, dataclasses.replace(head, node_rank=1), True)
    leave_in_order(paths, key, head, True)  # node 2 never says it left: named, after the wait
    assert "without word from node(s) 2 of 3" in capsys.readouterr().err
    leave_in_order(paths, key, dataclasses.replace(head, node_rank=2), False)  # it left, even failed
    leave_in_order(paths, key, head, True)
    assert "closed after the other 2 node(s) left" in capsys.readouterr().out


def test_rank_threads_share_task_cpus():
    s = collect_slurm_env(STEP)
    assert rank_threads(s, 4) == 2 and rank_threads(s, 16) == 1


def test_dist_env_from_torchrun():
    d = collect_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                          "GROUP_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "1234"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.master_port) == (3, 8, 1, "torchrun", 1234)


def test_dist_env_from_srun_one_task_per_rank():
    d = collect_dist_env({**STEP, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (5, 8, 1, 4, "srun")
    assert d.master_addr == "node1"


def test_dist_env_single():
    d = collect_dist_env({})
    assert (d.rank, d.world_size, d.launcher, d.distributed) == (0, 1, "single", False)


def test_node_launcher_on_a_cpu_node_needs_no_torch():
    """No GPU driver here: the per-node launcher decides 'CPU ranks' without importing torch (seconds
    of start-up per node); on GPU nodes it asks torch."""
    import subprocess
    import sys

    from hpcft.launch import gpu_driver_present

    code = "import sys; from hpcft.launch import node_gpus; print(node_gpus(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if gpu_driver_present():
        assert out.endswith("True")
    else:
        assert out == "(False, 0) False"


@pytest.mark.parametrize("tasks_per_node, cpus, node_cpus", [
    ("1(x2)", "16", 16),  # hpcft's own request: one task per node with all the CPUs
    ("4(x2)", "8", 32),  # --ntasks-per-node=4 --cpus-per-task=8: the launcher holds all four tasks' CPUs
    ("4(x1),3", "2", 6),  # uneven nodes: what the smallest node has, or srun cannot place the step
    ("2", None, None),  # no --cpus-per-task: srun's default
])
def test_one_launcher_per_node_holds_the_nodes_cpus(tasks_per_node, cpus, node_cpus):
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_TASKS_PER_NODE": tasks_per_node, **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})}
    slurm = collect_slurm_env(env)
    assert slurm.node_launcher_cpus == node_cpus
    argv = srun_argv(slurm, ["-m", "hpcft.train"])
    assert "--nodes=2" in argv and "--ntasks=2" in argv and "--ntasks-per-node=1" in argv
    assert (f"--cpus-per-task={node_cpus}" in argv) == (node_cpus is not None)
    assert not any(a.startswith("--gres") for a in argv)


@pytest.mark.parametrize("per_task, gres", [("1", "gpu:8"), ("a100:2", "gpu:16"), (None, None)])
def test_a_per_task_gpu_request_becomes_the_launchers_node_gpus(per_task, gres):
    """salloc --ntasks-per-node=8 --gpus-per-task=1: srun would give the node's one launcher one GPU."""
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_TASKS_PER_NODE": "8(x2)", **({"SLURM_GPUS_PER_TASK": per_task} if per_task else {})}
    argv = srun_argv(collect_slurm_env(env), ["-m", "hpcft.train"])
    assert [a for a in argv if a.startswith("--gres")] == ([f"--gres={gres}"] if gres else [])


def test_inside_a_pty_step_the_launcher_asks_for_every_gpu_of_the_node():
    """srun -N2 --ntasks-per-node=2 --gpus-per-task=1 --pty bash: the shell's environment has no
    SLURM_GPUS_PER_TASK (the shell's own task holds GPU 0), yet a new step inherits one GPU per task from
    the job; measured on the local cluster: the launcher got 1 GPU of 2 and a world of 2 instead of 4."""
    pty = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_STEP_GPUS": "0"}
    argv = srun_argv(collect_slurm_env(pty), ["-m", "hpcft.train"])
    assert "--gres=gpu:2" in argv and "--overlap" in argv and "--ntasks-per-node=1" in argv
    no_gpus = {k: v for k, v in pty.items() if "GPU" not in k}
    assert not any(a.startswith("--gres") for a in srun_argv(collect_slurm_env(no_gpus), ["-m", "hpcft.train"]))


def test_min_tasks_per_node_reads_slurms_compressed_list():
    assert [min_tasks_per_node(v) for v in ("1(x64)", "8,8,4(x2)", "", None, "x")] == [1, 4, 1, 1, 1]


WRAPPER_AT_THE_END = """
import signal, sys
from hpcft.rankrun import main
rc = main([sys.executable, "-c", "pass"])
print(rc, [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGUSR2)], flush=True)
signal.raise_signal(signal.SIGUSR1)  # the time-limit warning as the wrapper exits
"""


def test_the_rank_wrapper_ignores_a_warning_once_its_rank_has_ended(tmp_path):
    """A warning that lands while the wrapper exits after a finished rank (Python resets its handlers to
    the default at exit, which kills) would turn a finished run into a failed job."""
    env = {**os.environ, "HPCFT_RUN_DIR": str(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "HPCFT_STOP_SIGNAL": "USR2"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER_AT_THE_END], capture_output=True, text=True, env=env,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "0 [True, True]\n"), proc.stderr
    assert json.loads((tmp_path / "rank-000.exit.json").read_text())["returncode"] == 0


def test_an_agent_failing_after_its_ranks_exited_0_is_not_a_failure(tmp_path):
    """The node launcher's rule (hpcft.launch.run_node): torchrun exiting non-zero counts only if a rank of
    this node did not exit 0 (its agent can fail at shutdown when the store host on another node left first)."""
    import json

    from hpcft.launch import ranks_here_finished
    from hpcft.paths import RunPaths

    paths = RunPaths(tmp_path)

    def record(rank, host, rc):
        paths.rank_exit(rank).write_text(json.dumps({"rank": rank, "host": host, "returncode": rc, "ended": 1.0}))

    record(0, "node1", 0)
    assert not ranks_here_finished(paths, "node2", 2)  # no record of this node's ranks: nothing known
    record(2, "node2", 0)
    assert not ranks_here_finished(paths, "node2", 2)  # one of its two ranks has not reported
    record(3, "node2", 0)
    assert ranks_here_finished(paths, "node2", 2)
    record(1, "node1", 1)
    assert ranks_here_finished(paths, "node2", 2) and not ranks_here_finished(paths, "node1", 2)

