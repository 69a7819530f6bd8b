"""The launcher's network checks without a cluster: the interface that reaches the head node, ports,
and NCCL's own account of its transport read from recorded logs."""
import socket
from pathlib import Path

import pytest

from hpcft.network import (NetworkError, interface_for, nccl_transport, pick_port, port_free, resolve_head,
                           socket_over_ib_warning)

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_interface_is_the_one_holding_the_route_source_address(monkeypatch):
    import hpcft.network as net

    addresses = {"lo": "127.0.0.1/8", "eth0": "10.1.0.12/16", "ib0": "10.2.0.12/16"}
    monkeypatch.setattr(net, "source_address", lambda dest: {"10.2.0.11": "10.2.0.12", "10.1.0.11": "10.1.0.12",
                                                             "10.2.0.12": "10.2.0.12", "127.0.1.1": "127.0.0.1"}[dest])
    assert interface_for("10.2.0.11", addresses) == "ib0"  # the head node over IPoIB
    assert interface_for("10.1.0.11", addresses) == "eth0"
    assert interface_for("10.2.0.12", addresses) == "ib0"  # on the head node itself: its own interface, not lo
    assert interface_for("127.0.1.1", addresses) == "lo"  # the local cluster's nodes
    monkeypatch.setattr(net, "source_address", lambda dest: "192.168.9.9")
    assert interface_for("10.9.9.9", addresses) is None  # nothing holds it: left to gloo/NCCL


def test_a_head_node_that_does_not_resolve_is_named(monkeypatch):
    def no_name(host, *args, **kwargs):  # no resolver is asked: the failure is simulated
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    with pytest.raises(NetworkError, match=r"node .* cannot resolve the head node 'gpu001' \(Name or service not known\)"):
        resolve_head("gpu001")


def test_a_taken_port_moves_to_a_free_one_outside_the_job_id_band():
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert not port_free(taken)
        assert pick_port(taken) != taken and port_free(pick_port(taken))
        band = range(taken - 5, taken + 5)  # the next job ids' ports must never be the fallback
        picks = {pick_port(taken, avoid=band) for _ in range(20)}
        assert not picks & set(band) and all(port_free(p) for p in picks)


def test_srun_ranks_never_take_the_next_jobs_rendezvous_port():
    from hpcft.distenv import collect_dist_env, rdzv_port_for

    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    got = collect_dist_env(env)
    assert got.launcher == "srun" and got.world_size == 4
    assert got.master_port == rdzv_port_for("4242") != rdzv_port_for("4243")


@pytest.mark.parametrize("log,network,ib", [
    ("nccl_ib.log", "IB", ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]),
    ("nccl_socket_with_ib_hidden.log", "Socket", []),
    ("nccl_ib_disabled.log", "Socket", []),
])
def test_nccl_transport_from_recorded_logs(log, network, ib):
    t = nccl_transport((FIXTURES / log).read_text().splitlines())
    assert t["network"] == network and t["ib_devices"] == ib


def test_sockets_where_infiniband_exists_are_warned_about():
    ib = nccl_transport((FIXTURES / "nccl_ib.log").read_text().splitlines())
    assert socket_over_ib_warning(ib, {"gpu001": ["mlx5_0"]}) is None  # IB used: fine
    hidden = nccl_transport((FIXTURES / "nccl_socket_with_ib_hidden.log").read_text().splitlines())
    assert socket_over_ib_warning(hidden, {}) is None  # no IB anywhere: sockets are all there is
    warning = socket_over_ib_warning(hidden, {"gpu002": ["mlx5_0", "mlx5_1"], "gpu003": []})
    assert warning.startswith("NCCL used TCP sockets although InfiniBand devices exist on gpu002 (mlx5_0, mlx5_1)")
    assert "/dev/infiniband" in warning


def test_hpcft_logs_warns_from_rank_logs_and_the_launchers_lines(tmp_path):
    from hpcft.logs import network_warning
    from hpcft.paths import RunPaths

    run = tmp_path / "job" / "77"
    run.mkdir(parents=True)
    (run / "rank-000.log").write_text((FIXTURES / "nccl_ib_disabled.log").read_text())
    out = tmp_path / "slurm-77.out"
    out.write_text("hpcft.launch: network on gpu003: head node gpu001 is 10.1.0.11, reached through eth0 for gloo "
                   "and NCCL; rendezvous port 20077; InfiniBand devices here: mlx5_0, mlx5_1\n")
    assert "on gpu003 (mlx5_0, mlx5_1)" in network_warning(RunPaths(run), out)
    out.write_text("hpcft.launch: network on gpu003: head node gpu001 is 10.1.0.11, reached through eth0 for gloo\n")
    assert network_warning(RunPaths(run), out) is None
