import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster():
    """The real local Slurm cluster (2 nodes, 4 fake GPUs each), started once if it is not up."""
    subprocess.run(["bash", str(ROOT / "envs/local-cluster.sh"), "up", "--nodes", "2"], check=True)
    line = subprocess.run(["bash", str(ROOT / "envs/local-cluster.sh"), "env"], check=True, capture_output=True,
                          text=True).stdout.strip()
    conf = line.split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    return conf


def pytest_collection_modifyitems(config, items):
    """Tests that take the cluster down (and bring it back) run after all others, which share it."""
    items.sort(key=lambda item: item.get_closest_marker("cluster_restart") is not None)
