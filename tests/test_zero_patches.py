"""ZeRO-3 in fp32 keeps one fp32 partition per rank, not two: hpcft's narrow fix while the installed
DeepSpeed compares a device with a string, none once DeepSpeed's own code takes its intended branch.
ZeRO ranks start DeepSpeed's comm without its inference-only shared-memory op."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcft.train.zero_patches import _DeviceName, fp32_partition_copy_bug

ROOT = Path(__file__).resolve().parents[1]


def test_a_device_name_equals_the_device_it_names():
    assert torch.device("cpu") == _DeviceName("cpu") and torch.device("cuda", 0) == _DeviceName("cuda:0")
    assert torch.device("cuda", 1) != _DeviceName("cuda:0") and _DeviceName("cpu") == "cpu"
    assert torch.device("cpu") != "cpu"  # what DeepSpeed's comparison runs into


@pytest.mark.parametrize("precision, shared", [("fp32", True), pytest.param("bf16", False, marks=pytest.mark.slow)])
def test_fp32_master_partitions_are_not_copied(tiny_model, precision, shared):
    """Either case of the installed DeepSpeed: with the bug, the patch must run and share; without it,
    DeepSpeed shares by itself and hpcft leaves it alone. bf16 weights need their fp32 copy."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "zero3_partition_worker.py"), str(tiny_model), precision],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["shared"] is shared and result["groups"] >= 1
    assert result["patched"] == result["bug_in_deepspeed"] == fp32_partition_copy_bug()
    assert result["shm_op"] is False  # DeepSpeed's inference-only shared-memory op: not built, not loaded
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
