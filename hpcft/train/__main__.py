"""The shared training entrypoint; every launch path ends here.

    python -m hpcft.train --model_name=artifacts/tiny-llama --data_path=data/samsum_tiny.jsonl
    torchrun --nproc-per-node 2 -m hpcft.train --max_train_step=20
Flags are the fields of hpcft.train.config.TrainConfig (--name=value or --name value; a bare --flag is
true), and llama-recipes' names as its guides write them (--enable_fsdp --pure_bf16 --dataset samsum_dataset
--dist_checkpoint_root_folder R --dist_checkpoint_folder F --output_dir D --fsdp_config.sharding_strategy S
...: hpcft.train.recipe_flags); rank 0 logs what each of those became.
"""
from __future__ import annotations

import sys

from hpcft.errors import SpecError
from hpcft.train.config import parse_flags
from hpcft.train.dist import DeviceError
from hpcft.train.preflight import PreflightError
from hpcft.transformers_index import install as install_transformers_index


def main(argv: list[str] | None = None) -> int:
    install_transformers_index()  # before anything imports transformers: ~1.3 CPU-s less per rank start
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        cfg, notes = parse_flags(argv)
        cfg.validate()
        from hpcft.train.run import run

        run(cfg, flag_notes=notes)
    except SpecError as exc:
        print(f"hpcft.train: error: {exc}", file=sys.stderr)
        return 2
    except PreflightError as exc:
        print(f"hpcft.train: preflight failed: {exc}", file=sys.stderr)
        return 3
    except DeviceError as exc:
        print(f"hpcft.train: error: {exc}", file=sys.stderr)
        return 3
    return 0


def exit_now(code: int) -> None:
    """Leave without interpreter teardown once the run's files are written and closed. Tearing down
    torch/DeepSpeed/gloo C++ threads at exit aborts the process now and then ("terminate called
    without an active exception", SIGABRT, seen after a finished ZeRO-2 run in the benchmarks); that
    would fail a good job under torchrun and Slurm. Output and log handlers are flushed first."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
