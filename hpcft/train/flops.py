"""Model FLOPs, peak FLOPs and MFU, and per-rank peak memory."""
from __future__ import annotations

import resource
import time

import torch



def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention scores (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def model_shape(config) -> tuple[int, int]:
    layers = getattr(config, "num_hidden_layers", None) or (
        getattr(config, "encoder_layers", 0) + getattr(config, "decoder_layers", 0))
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    return int(layers or 0), int(hidden or 0)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3, n: int = 1024) -> float:
    """This process's own matmul throughput: the CPU 'peak' MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2.0 * n ** 3 * iters / (time.perf_counter() - start)


def peak_flops(override_tflops: float | None, device: torch.device, dtype: torch.dtype, *,
               tf32: bool = False) -> tuple[float, str]:
    """Per-rank peak for MFU: train.peak_tflops, else the GPU's datasheet peak for its variant and the
    run's number format (hpcft.train.gpupeaks), else this process's measured matmul rate."""
    from hpcft.train.gpupeaks import gpu_peak, precision_key

    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, precision_key(str(dtype), tf32=tf32))
        if found:
            return found
    return measure_matmul_peak(device, dtype), f"measured {dtype} matmul on {device.type}"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
