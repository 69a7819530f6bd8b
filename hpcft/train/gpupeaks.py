"""Datasheet peaks of GPUs by variant and number format, for MFU (no torch here: a name in, a peak out).

    gpu_peak("NVIDIA H100 PCIe", "bf16")  ->  (756e12, "H100 PCIe, bf16 dense 756 TFLOP/s (datasheet)")

Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets; "fp32" is the plain
(non tensor-core) FP32 rate, "tf32" the tensor-core one. The variant comes from the device name
torch reports: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not.
"""
from __future__ import annotations

import re

# (variant, pattern over the upper-cased device name, peaks by format). First match wins: specific first.
PEAKS: list[tuple[str, str, dict[str, float]]] = [
    ("GB200", r"\bGB200\b", {"fp32": 80, "tf32": 1250, "bf16": 2500, "fp16": 2500, "fp8": 5000}),
    ("B200", r"\bB200\b", {"fp32": 80, "tf32": 1100, "bf16": 2250, "fp16": 2250, "fp8": 4500}),
    ("GH200", r"\bGH200\b", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("H200 NVL", r"\bH200\b.*\bNVL\b", {"fp32": 60, "tf32": 417.5, "bf16": 835, "fp16": 835, "fp8": 1670}),
    ("H200 SXM", r"\bH200\b", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("H100 NVL", r"\bH100\b.*\bNVL\b", {"fp32": 60, "tf32": 417.5, "bf16": 835, "fp16": 835, "fp8": 1670}),
    ("H100 PCIe", r"\bH100\b.*\bPCIE\b", {"fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756, "fp8": 1513}),
    ("H100 SXM", r"\bH100\b", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("H800 PCIe", r"\bH800\b.*\bPCIE\b", {"fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756, "fp8": 1513}),
    ("H800 SXM", r"\bH800\b", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("A100", r"\bA100\b", {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}),
    ("A800", r"\bA800\b", {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}),
    ("L40S", r"\bL40S\b", {"fp32": 91.6, "tf32": 183, "bf16": 362, "fp16": 362, "fp8": 733}),
    ("L40", r"\bL40\b", {"fp32": 90.5, "tf32": 90.5, "bf16": 181, "fp16": 181, "fp8": 362}),
    ("L4", r"\bL4\b", {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121, "fp8": 242}),
    ("A40", r"\bA40\b", {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7}),
    ("A10G", r"\bA10G\b", {"fp32": 31.2, "tf32": 35, "bf16": 70, "fp16": 70}),
    ("A10", r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125}),
    ("V100", r"\bV100\b", {"fp32": 15.7, "fp16": 125}),
    ("MI300X", r"\bMI300X\b", {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9}),
    ("MI250X", r"\bMI250X\b", {"fp32": 95.7, "bf16": 383, "fp16": 383}),
]


def precision_key(dtype_name: str, *, tf32: bool) -> str:
    """The datasheet column a run's matmuls use: bfloat16 -> bf16, float16 -> fp16, float8 -> fp8,
    float32 -> tf32 when TF32 matmuls are on, else plain fp32."""
    name = dtype_name.replace("torch.", "")
    if name == "float32":
        return "tf32" if tf32 else "fp32"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp8" if name.startswith("float8") else name)


def gpu_peak(device_name: str, key: str) -> tuple[float, str] | None:
    """(FLOP/s, where it came from) for this device and format; None for an unknown device or a format
    it has no peak for (V100 has no bf16)."""
    upper = device_name.upper().replace("NVIDIA ", "").replace("-", " ")
    for variant, pattern, peaks in PEAKS:
        if re.search(pattern, upper):
            if key not in peaks:
                return None
            return peaks[key] * 1e12, f"{device_name}: {variant}, {key} dense {peaks[key]:g} TFLOP/s (datasheet)"
    return None
