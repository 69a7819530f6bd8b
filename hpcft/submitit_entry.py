"""What a submitit job runs on each node: the same node launcher as the sbatch path."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from hpcft.distenv import RDZV_PORT_VAR, RUN_DIR_VAR


@dataclass
class NodeTask:
    command: list[str]
    job_dir: str
    env: dict[str, str] = field(default_factory=dict)
    rdzv_port: int | None = None

    def __call__(self) -> int:
        import sys

        job_id = os.environ["SLURM_JOB_ID"]
        env = dict(os.environ, **self.env)
        env[RUN_DIR_VAR] = os.path.join(self.job_dir, job_id)
        if self.rdzv_port is not None:
            env[RDZV_PORT_VAR] = str(self.rdzv_port)
        os.makedirs(env[RUN_DIR_VAR], exist_ok=True)
        rc = subprocess.call([sys.executable, "-m", "hpcft.launch", "--node", "--", *self.command], env=env)
        if rc != 0:
            raise RuntimeError(f"node launcher exited with status {rc}; see hpcft logs {job_id}")
        return rc
