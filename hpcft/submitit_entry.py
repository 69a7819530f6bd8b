"""What a submitit job runs on each node: the same node launcher as the sbatch path."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from hpcft.paths import RUN_DIR_ENV


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
        env[RUN_DIR_ENV] = os.path.join(self.job_dir, job_id)
        if self.rdzv_port is not None:
            env["HPCFT_RDZV_PORT"] = str(self.rdzv_port)
        os.makedirs(env[RUN_DIR_ENV], exist_ok=True)
        rc = subprocess.call([sys.executable, "-m", "hpcft.launch", "--node", "--", *self.command], env=env)
        if rc != 0:
            raise RuntimeError(f"node launcher exited with status {rc}; see hpcft logs {job_id}")
        return rc
