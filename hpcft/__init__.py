"""hpcft: Slurm-aware fine-tuning of LLMs across many GPUs and nodes."""

__version__ = "0.1.0"
