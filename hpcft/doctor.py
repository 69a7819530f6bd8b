"""`hpcft doctor`: the preflight checks (hpcft.train.preflight) on every rank of an allocation.

    salloc --nodes=2 --gpus-per-node=4 hpcft doctor
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hpcft.distenv import RUN_DIR_VAR, collect_dist_env
from hpcft.train.dist import cleanup, print0, setup_distributed
from hpcft.train.preflight import PreflightError, preflight


def main() -> int:
    rt = setup_distributed(collect_dist_env(), timeout_s=120)
    run_dir = Path(os.environ.get(RUN_DIR_VAR, "runs/doctor"))
    try:
        print0(rt, preflight(rt, run_dir))
    except PreflightError as exc:
        print(f"hpcft preflight: FAILED: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
