import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite tests/golden/* and slurm/multi_node.slurm from the current renderer")


@pytest.fixture(scope="session")
def update_goldens(request):
    return request.config.getoption("--update-goldens")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama + tokenizer built once per session, through the same command users run."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run([sys.executable, "-m", "hpcft.cli", "make-tiny-model", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out
