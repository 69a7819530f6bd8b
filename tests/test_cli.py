"""The CLI as users run it, without a cluster: bad input is one line, exit 2, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HPCFT = [sys.executable, "-m", "hpcft.cli"]


def hpcft(*args, cwd, env=None):
    return subprocess.run([*HPCFT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_the_script_with_overrides(tmp_path):
    proc = hpcft("submit", "--dry-run", str(ROOT / "jobs/samsum_tiny.yaml"), "--nodes", "3", "train.lr=3e-4",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=3\n" in proc.stdout and "--lr=0.0003" in proc.stdout
    # Relative paths of the spec are resolved against the submit directory.
    assert f"--model_name={tmp_path}/artifacts/tiny-llama" in proc.stdout.replace(" \\\n  ", " ")
    assert not (tmp_path / "runs").exists()


def test_dry_run_submitit_prints_submitits_script_and_writes_nothing(tmp_path):
    proc = hpcft("submit", "--dry-run", "--backend", "submitit", str(ROOT / "jobs/samsum_tiny.yaml"), "--nodes", "2",
                 "--gpus-per-node", "3", "resources.time=00:30:00", "launch.signal_lead_s=90", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")
    lines = proc.stdout.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=3", "#SBATCH --signal=USR2@90", "#SBATCH --time=30",
                 "#SBATCH --job-name=samsum-tiny", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert line in lines, line
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1 --ntasks-per-node=1" in srun and "-m submitit.core._submit" in srun
    assert f"{tmp_path}/runs/samsum-tiny/submitit/%j" in srun
    assert list(tmp_path.iterdir()) == []


def test_user_command_after_double_dash(tmp_path):
    proc = hpcft("submit", "--dry-run", str(ROOT / "jobs/samsum_tiny.yaml"), "--", "my_train.py", "--my-arg", "a b",
                 cwd=tmp_path)
    assert proc.returncode == 0
    assert "-m hpcft.launch --node -- my_train.py --my-arg 'a b' \"$@\"" in proc.stdout.replace(" \\\n  ", " ")


def test_missing_model_fails_before_submission(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {"model_name": "no/such/model"}}))
    env = dict(os.environ, PATH="/nonexistent")  # even sbatch being absent is never reached
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train.model_name: no model directory" in proc.stderr
    assert "hpcft make-tiny-model" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_field_one_line_exit_2(tmp_path):
    proc = hpcft("submit", str(ROOT / "jobs/samsum_tiny.yaml"), "--gpus-per-node", "many", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "hpcft: error: resources.gpus_per_node: must be an integer (got 'many')\n"


def test_launch_outside_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = hpcft("launch", "--", "-m", "hpcft.train", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "not inside a Slurm allocation" in proc.stderr


def test_logs_of_unknown_run(tmp_path):
    proc = hpcft("logs", "12345", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no run directory" in proc.stderr


def test_make_tiny_model_bad_shape(tmp_path):
    proc = hpcft("make-tiny-model", str(tmp_path / "m"), "--hidden-size", "130", cwd=tmp_path)
    assert proc.returncode == 2 and "--hidden-size" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_qlora_without_bitsandbytes_fails_before_submission(tmp_path, tiny_model):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "train": {"model_name": str(tiny_model), "use_peft": True, "quantization": "4bit",
                                              "data_path": str(ROOT / "data/samsum_tiny.jsonl")}}))
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 2 and "train.quantization" in proc.stderr and "bitsandbytes" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_relative_paths_resolve_against_the_submit_directory(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    proc = hpcft("submit", "--dry-run", str(ROOT / "jobs/zero3_tiny.yaml"), "train.deepspeed_config=ds.json",
                 "train.resume=old/checkpoints/step-00000010", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace(" \\\n  ", " ")
    assert f"--deepspeed_config={tmp_path}/ds.json" in text
    assert f"--resume={tmp_path}/old/checkpoints/step-00000010" in text


BAD_DATA = {
    "malformed": ('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summary": \n', "train.data_path",
                  "data.jsonl:2 is not valid JSON"),
    "missing-column": ('{"dialogue": "a", "summary": "b"}\n{"dialogue": "only"}\n', "train.data_path",
                       "example 2 lacks text column(s) summary"),
    "empty": ("\n\n", "train.data_path", "holds no examples"),
    "unknown-form": ('{"text": "hello"}\n', "train.data_path", "cannot tell the data form"),
    "too-long": ('{"dialogue": "' + "word " * 400 + '", "summary": "b"}\n', "train.context_length",
                 "no room for its answer in context_length 256"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_at_submit_with_one_line(tmp_path, tiny_model, case):
    text, field, message = BAD_DATA[case]
    (tmp_path / "data.jsonl").write_text(text)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {
        "model_name": str(tiny_model), "data_path": "data.jsonl", "dataset": "auto"}}))
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"hpcft: error: {field}: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()
