"""`bash tests/gpu/run.sh` is present and runnable: without CUDA it says so and exits 0; its harness
(tests/gpu/matrix.py) runs its cases end to end on CPU ranks with the tiny model (--cpu-smoke): a
strategy, an export reloaded with the run's eval loss, a stopped and resumed run, the results table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_skips_cleanly_without_cuda():
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/run.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here (torch.cuda.is_available() is False): skipped" in proc.stdout


@pytest.mark.slow
def test_the_harness_runs_its_cases_on_cpu_ranks(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/matrix.py"), "--out", str(tmp_path), "--cpu-smoke",
                           "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["case"] for r in results] == ["ddp", "fsdp", "fsdp resume", "ddp resume, async checkpoint"]
    assert all(r["ok"] for r in results), results
    assert "export reloads" in results[1]["detail"]
    assert all("resumed: losses within" in r["detail"] for r in results[2:])
    assert (tmp_path / "results.md").read_text().startswith("GPU check on 2 CPU ranks (smoke)")
