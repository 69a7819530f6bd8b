"""The CUDA-only logic, tested without a GPU: which GPU a rank takes, datasheet peaks by variant and
format, NCCL defaults under the user's settings, TF32, and what the launcher makes of each way Slurm
grants GPUs."""
import dataclasses

import pytest
import torch

from hpcft.distenv import NCCL_DEFAULTS, collect_slurm_env, nccl_report, plan_rendezvous
from hpcft.errors import SpecError
from hpcft.launch import node_env
from hpcft.train.config import TrainConfig
from hpcft.train.dist import DeviceError, gpu_index
from hpcft.train.gpupeaks import gpu_peak, precision_key
from hpcft.train.precision import apply_tf32


@pytest.mark.parametrize("local_rank, local_world, visible, gpu", [
    (3, 4, 4, 3),  # torchrun, one task per node: every rank sees the node's GPUs
    (3, 4, 8, 3),  # fewer ranks than GPUs: the first ones
    (3, 4, 1, 0),  # srun --gpus-per-task=1: each rank sees its own GPU as device 0
    (0, 1, 1, 0),
])
def test_each_rank_gets_a_gpu_of_its_own(local_rank, local_world, visible, gpu):
    assert gpu_index(local_rank, local_world, visible) == gpu


@pytest.mark.parametrize("local_rank, local_world, visible", [(3, 4, 2), (2, 4, 3)])
def test_two_ranks_on_one_gpu_is_an_error_not_a_silent_share(local_rank, local_world, visible):
    with pytest.raises(DeviceError, match=f"local rank {local_rank} of {local_world} on this node sees {visible} GPU"):
        gpu_index(local_rank, local_world, visible)


@pytest.mark.parametrize("name, key, tflops, variant", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4, "H100 SXM"),
    ("NVIDIA H100 PCIe", "bf16", 756, "H100 PCIe"),
    ("NVIDIA H100 NVL", "bf16", 835, "H100 NVL"),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7, "H100 SXM"),
    ("NVIDIA H100 80GB HBM3", "fp8", 1978.9, "H100 SXM"),
    ("NVIDIA H200", "bf16", 989.4, "H200 SXM"),
    ("NVIDIA H200 NVL", "bf16", 835, "H200 NVL"),
    ("NVIDIA GH200 480GB", "bf16", 989.4, "GH200"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312, "A100"),
    ("NVIDIA A100 80GB PCIe", "tf32", 156, "A100"),
    ("NVIDIA L40S", "bf16", 362, "L40S"),
    ("NVIDIA L4", "bf16", 121, "L4"),
    ("NVIDIA A10G", "bf16", 70, "A10G"),
    ("NVIDIA A10", "bf16", 125, "A10"),
    ("Tesla V100-SXM2-32GB", "fp16", 125, "V100"),
    ("AMD Instinct MI300X", "bf16", 1307.4, "MI300X"),
])
def test_datasheet_peaks_by_variant_and_format(name, key, tflops, variant):
    peak, source = gpu_peak(name, key)
    assert peak == pytest.approx(tflops * 1e12) and f"{variant}, {key} dense" in source and name in source


def test_unknown_gpus_and_missing_formats_have_no_peak():
    assert gpu_peak("NVIDIA Quadro RTX 6000", "bf16") is None
    assert gpu_peak("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta


def test_the_runs_format_picks_the_column():
    assert precision_key("torch.bfloat16", tf32=False) == "bf16"
    assert precision_key("torch.float16", tf32=False) == "fp16"
    assert precision_key("torch.float32", tf32=True) == "tf32"
    assert precision_key("torch.float32", tf32=False) == "fp32"
    assert precision_key("torch.float8_e4m3fn", tf32=False) == "fp8"


def test_tf32_is_on_for_fp32_on_cuda_unless_turned_off():
    try:
        assert apply_tf32("fp32", None, torch.device("cuda", 0)) and torch.backends.cuda.matmul.allow_tf32
        assert not apply_tf32("fp32", False, torch.device("cuda", 0)) and not torch.backends.cuda.matmul.allow_tf32
        assert not apply_tf32("bf16", None, torch.device("cuda", 0))  # autocast does the matmuls in bf16
        assert not apply_tf32("fp32", True, torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


BATCH = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
         "SLURM_CPUS_PER_TASK": "32", "HPCFT_RUN_DIR": "/scratch/runs/job/77"}


def test_nccl_defaults_on_cuda_nodes_yield_to_the_users():
    slurm = collect_slurm_env(BATCH)
    rdzv = plan_rendezvous(slurm, cuda_devices=8)
    env = node_env(slurm, rdzv, {**BATCH, "NCCL_DEBUG": "WARN"}, cuda=True)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_DEBUG"] == "WARN"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/scratch/runs/job/77/nccl_trace/nccl_trace_rank_"
    assert "OMP_NUM_THREADS" not in env or env["OMP_NUM_THREADS"] == BATCH.get("OMP_NUM_THREADS")
    report = nccl_report(env)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (hpcft default)" in report and "NCCL_DEBUG=WARN," in report + ","
    cpu = node_env(slurm, rdzv, BATCH, cuda=False)
    assert not set(NCCL_DEFAULTS) & set(cpu) and cpu["HPCFT_CPU_NODE"] == "1"


def test_cpu_ranks_get_threads_the_node_really_has_and_idle_threads_sleep():
    slurm = collect_slurm_env(BATCH)  # 32 CPUs per task
    rdzv = plan_rendezvous(slurm, cuda_devices=0)
    big = node_env(slurm, rdzv, BATCH, cuda=False, cores=64)
    assert big["OMP_NUM_THREADS"] == str(32 // rdzv.nproc_per_node)
    small = node_env(slurm, rdzv, BATCH, cuda=False, cores=2)  # Slurm says 32, the machine has 2
    assert small["OMP_NUM_THREADS"] == str(max(1, 2 // rdzv.nproc_per_node))
    two = node_env(slurm, dataclasses.replace(rdzv, nproc_per_node=1), BATCH, cuda=False, cores=2)
    assert two["OMP_NUM_THREADS"] == "2" and two["OMP_WAIT_POLICY"] == "PASSIVE"
    mine = node_env(slurm, dataclasses.replace(rdzv, nproc_per_node=1), {**BATCH, "OMP_WAIT_POLICY": "ACTIVE",
                                                                         "OMP_NUM_THREADS": "3"}, cuda=False, cores=2)
    assert mine["OMP_WAIT_POLICY"] == "ACTIVE" and mine["OMP_NUM_THREADS"] == "3"
    one = node_env(slurm, dataclasses.replace(rdzv, nproc_per_node=1), {**BATCH, "OMP_NUM_THREADS": "1"},
                   cuda=False, cores=2)
    assert "OMP_WAIT_POLICY" not in one


@pytest.mark.parametrize("granted, ranks", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),  # --gpus-per-node=4 or --gres=gpu:4
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),  # --gpus-per-node=a100:4 (typed)
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),  # only the job's GPU list
    ({}, 1),  # no GPUs asked for: one rank per node
])
def test_the_launcher_counts_what_slurm_granted_on_nodes_without_cuda(granted, ranks):
    slurm = collect_slurm_env({**BATCH, **granted})
    assert plan_rendezvous(slurm, cuda_devices=0).nproc_per_node == ranks
    assert plan_rendezvous(slurm, cuda_devices=8).nproc_per_node == 8  # where CUDA is, what torch sees


def test_flash_attention_needs_a_16_bit_precision():
    TrainConfig(attn_implementation="flash_attention_2", precision="bf16").validate()
    with pytest.raises(SpecError, match="train.attn_implementation: flash_attention_2 computes in bf16/fp16 only"):
        TrainConfig(attn_implementation="flash_attention_2", precision="fp32").validate()
