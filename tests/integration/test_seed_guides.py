"""The llama-recipes multi-GPU guide's own command lines on the cluster: each torchrun line's flags (the model
path and data replaced by the tiny model and the shipped data, `--pure_bf16` on CPU ranks) trains on two
nodes, some through `sbatch slurm/multi_node.slurm FLAGS` and the others through `hpcft submit -- FLAGS`,
and leaves its model where the guide's flags say. A typo ends an sbatch job before any rank starts, with
the one line in `hpcft logs`. How each flag is read: tests/test_recipe_flags.py."""
import json
import os
import sys
from pathlib import Path

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import HPCFT, ROOT, run, selected, submitted_job_id
from tests.test_recipe_flags import GUIDE

pytestmark = pytest.mark.slurm
MODEL_IN_GUIDE = ("/path_of_model_folder/8B", "/path_of_model_folder/70B")
# Where each line trains. Every line once, each path with a PEFT line and a full-model line. Two more of
# llama-recipes' own flags keep CI short: a few steps, a few eval batches.
PATHS = {"fsdp-peft": "sbatch", "70b": "sbatch", "alpaca": "sbatch",
         "fast-kernels": "submit", "fsdp-only": "submit", "grammar": "submit", "samsum": "submit"}
SHORT = ["--max_train_step", "3", "--max_eval_step", "2"]
DATA = {"alpaca": ["--alpaca_dataset.data_path", str(ROOT / "data/alpaca_tiny.jsonl")],
        "grammar": ["--grammar_dataset.train_split", str(ROOT / "data/grammar_tiny.csv")]}


def guide_flags(line: str, tiny_model: Path) -> list[str]:
    flags = GUIDE[line][0]
    for path in MODEL_IN_GUIDE:
        flags = flags.replace(path, str(tiny_model))
    return [*flags.split(), *DATA.get(line, ["--data_path", str(ROOT / "data/samsum_tiny.jsonl")]), *SHORT]


def sbatch(tmp_path: Path, flags: list[str]) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("HPCFT_PYTHON", None)
    proc = run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1",
                str(ROOT / "slurm/multi_node.slurm"), *flags], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(";")[0]


def submit(tmp_path: Path, flags: list[str]) -> tuple[str, str]:
    proc = run([*HPCFT, "submit", "--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "00:10:00",
                "--", *flags], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return submitted_job_id(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def guide_jobs(cluster, tiny_model, tmp_path_factory, request):
    """Every selected line queued at once, each in its own directory (the guide's output folders are
    relative to where it runs): line -> (job id, its directory, what hpcft submit said)."""
    wanted = selected(request)
    lines = sorted(wanted.get("test_guide_line_trains_and_leaves_its_model_where_its_flags_say", set()))
    jobs = {}
    for line in lines:
        where = tmp_path_factory.mktemp(line)
        (where / "runs").mkdir()
        flags = guide_flags(line, tiny_model)
        if PATHS[line] == "sbatch":
            jobs[line] = (sbatch(where, flags), where, "")
        else:
            job_id, said = submit(where, flags)
            jobs[line] = (job_id, where, said)
    return jobs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.quick) if n == "samsum" else n for n in PATHS])
def test_guide_line_trains_and_leaves_its_model_where_its_flags_say(guide_jobs, tiny_model, name):
    line = name
    job_id, where, said = guide_jobs[line]
    if PATHS[line] == "submit":  # hpcft submit says what the flags became before the job runs
        assert "hpcft: llama-recipes flag --enable_fsdp -> strategy=fsdp" in said, said
    info = wait_for(job_id, poll_s=2, timeout_s=900)
    run_dir = next(where.glob(f"runs/*/{job_id}"))
    logs = {p.name: p.read_text() for p in sorted(run_dir.glob("rank-*.log"))}
    assert info.state == "COMPLETED", (line, info, {k: v[-2000:] for k, v in logs.items()})
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = GUIDE[line][1]
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2
    assert summary["precision"] == expected.get("precision", "fp32") and summary["use_peft"] == ("export_dir" in expected
                                                                                                 and "PEFT" in expected["export_dir"])
    # The model where llama-recipes puts it, relative to where the job ran: the adapter in --output_dir, a full
    # FSDP model in <dist_checkpoint_root_folder>/<dist_checkpoint_folder>-<model_name>.
    export = where / expected["export_dir"].replace(MODEL_IN_GUIDE[0], str(tiny_model)).replace(MODEL_IN_GUIDE[1],
                                                                                                  str(tiny_model))
    if "PEFT" in expected["export_dir"]:
        assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    else:
        assert str(export).startswith(f"{where}/model_checkpoints/fine-tuned-/") and (export / "config.json").is_file()
        assert (export / "model.safetensors").is_file()
    assert summary["model_dir"] == str(export)
    assert not (run_dir / "model").exists()
    # What each llama-recipes flag became is said once: by rank 0 when the ranks read the guide's flags
    # (sbatch), by hpcft submit on the login node otherwise (the script then holds hpcft's own names).
    said_by_rank0 = logs["rank-000.log"].count("hpcft.train: llama-recipes flags: ")
    assert said_by_rank0 == (PATHS[line] == "sbatch")
    if said_by_rank0:
        assert "--enable_fsdp -> strategy=fsdp" in logs["rank-000.log"]
    assert "llama-recipes flags" not in logs["rank-001.log"]


@pytest.mark.quick
def test_a_typo_ends_the_sbatch_job_before_any_rank_starts(cluster, tiny_model, tmp_path):
    (tmp_path / "runs").mkdir()
    flags = guide_flags("70b", tiny_model)
    flags[flags.index("--enable_fsdp")] = "--enable_fdsp"
    job_id = sbatch(tmp_path, flags)
    info = wait_for(job_id, poll_s=1, timeout_s=300)
    assert info.state == "FAILED", info  # exit 2 from the launchers (srun may report its SIGTERM to the other)
    run_dir = tmp_path / "runs" / "hpcft" / job_id
    assert not list(run_dir.glob("rank-*"))  # no rank started: the launcher refused the flags first
    proc = run([*HPCFT, "logs", "--failure-only", job_id, "--output-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 1
    assert "refused before any rank started: hpcft.train: error: train.enable_fdsp: unknown flag (did you mean " \
           "--enable_fsdp?)" in " ".join(proc.stderr.split()), proc.stderr
    out = (tmp_path / "runs" / f"slurm-{job_id}.out").read_text()
    assert out.count("did you mean --enable_fsdp?") == 1, out  # one line for the job, not one per node or rank
