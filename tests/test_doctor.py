"""The preflight checks on facts gathered from ranks (as all_gather_object would deliver them)."""
import pytest

from hpcft.train.preflight import PreflightError, RankFacts, check_devices, check_run_dir, check_versions, check_world

V = (("torch", "2.13.0"), ("transformers", "5.23.0"), ("hpcft", "0.1.0"))


def facts(rank, host, local_rank=0, cuda=0, versions=V, wrote="ok"):
    return RankFacts(rank, host, local_rank, 2, cuda, versions, wrote)


def test_healthy_world_passes(tmp_path):
    probe = tmp_path / "p"
    probe.write_text("x")
    fs = [facts(0, "n1", 0, 2, wrote=str(probe)), facts(1, "n1", 1, 2, wrote=str(probe)),
          facts(2, "n2", 0, 2, wrote=str(probe)), facts(3, "n2", 1, 2, wrote=str(probe))]
    check_world(fs, world_size=4, slurm_nodes=2)
    check_devices(fs)
    check_versions(fs)
    check_run_dir(fs, tmp_path)


def test_separate_worlds_are_caught():
    with pytest.raises(PreflightError, match="separate worlds"):
        check_world([facts(0, "n1"), facts(1, "n1")], world_size=2, slurm_nodes=2)


def test_uneven_ranks_per_node():
    with pytest.raises(PreflightError, match="nodes x ranks per node"):
        check_world([facts(0, "n1"), facts(1, "n1"), facts(2, "n2")], world_size=3, slurm_nodes=2)


def test_local_rank_beyond_visible_gpus():
    with pytest.raises(PreflightError, match=r"rank 2 on n1: local rank 2 of 2 on this node sees 2 GPU\(s\).*would share"):
        check_devices([facts(0, "n1", 0, 2), facts(2, "n1", 2, 2)])


def test_version_mismatch_names_rank_and_package():
    other = (("torch", "2.12.0"),) + V[1:]
    with pytest.raises(PreflightError, match=r"rank 1 on n2 .*torch 2.13.0 vs 2.12.0"):
        check_versions([facts(0, "n1"), facts(1, "n2", versions=other)])


def test_run_dir_not_writable_or_not_shared(tmp_path):
    with pytest.raises(PreflightError, match="cannot write"):
        check_run_dir([facts(0, "n1", wrote="error: Permission denied")], tmp_path)
    with pytest.raises(PreflightError, match="not on a shared filesystem"):
        check_run_dir([facts(1, "n2", wrote=str(tmp_path / "missing"))], tmp_path)
