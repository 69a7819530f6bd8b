"""Model FLOPs, peak FLOPs and MFU, and per-rank peak memory."""
from __future__ import annotations

import resource
import time

import torch

# Dense bf16 tensor-core peaks per GPU, in FLOP/s (vendor datasheets; no sparsity).
KNOWN_PEAKS = {
    "GB200": 2.5e15, "B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "A40": 150e12, "A10G": 70e12,
    "A10": 125e12, "L4": 121e12, "V100": 125e12, "MI300X": 1307e12, "MI250X": 383e12,
}


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


def peak_flops(override_tflops: float | None, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name.upper().replace("NVIDIA ", ""):
                return value, name
    return measure_matmul_peak(device, dtype), f"measured {dtype} matmul on {device.type}"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
