"""Every strategy of the shared entrypoint on 2 real local Slurm nodes (1 rank each; 2 each for
HYBRID_SHARD, whose point is the split between nodes): FSDP in all four
sharding modes and ZeRO 1/2/3, each with and without LoRA, trains to a lower eval loss and exports a
model whose eval loss, reloaded in one process, equals the run's last eval. Resume after a stop at
step 4 reproduces the uninterrupted losses for ddp, fsdp and zero3; seq2seq (BART) trains."""
import json
import subprocess
import sys

import pytest

from hpcft.jobs import wait_for
from tests.integration.helpers import (HPCFT, ROOT, check_run, run, selected, submitted_job_id, train_losses,
                                       write_spec)

pytestmark = pytest.mark.slurm

MATRIX = {
    "fsdp-full": {"strategy": "fsdp", "sharding_strategy": "FULL_SHARD"},
    "fsdp-grad-op": {"strategy": "fsdp", "sharding_strategy": "SHARD_GRAD_OP"},
    "fsdp-no-shard": {"strategy": "fsdp", "sharding_strategy": "NO_SHARD"},
    "fsdp-hybrid": {"strategy": "fsdp", "sharding_strategy": "HYBRID_SHARD"},
    "zero1": {"strategy": "zero1"},
    "zero2": {"strategy": "zero2"},
    "zero3": {"strategy": "zero3"},
}
MATRIX.update({f"{k}-lora": {**v, "use_peft": True, "lr": 5e-3} for k, v in list(MATRIX.items())})
MATRIX["ddp"] = {"strategy": "ddp"}
RESUMED = ("ddp", "fsdp-full", "zero3")
COMMON = {"gradient_accumulation_steps": 2, "log_every": 1}


def ranks_per_node(name: str) -> int:
    return 2 if name.startswith("fsdp-hybrid") else 1


def submit(tmp_path, tiny_model, name, train, extra=()):
    spec = write_spec(tmp_path, tiny_model, filename=f"{name}.yaml", name=name,
                      resources={"nodes": 2, "gpus_per_node": ranks_per_node(name), "cpus_per_task": 4,
                                 "time": "00:15:00"},
                      train={**COMMON, **train})
    proc = run([*HPCFT, "submit", str(spec), *extra], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return submitted_job_id(proc.stdout)


def wait_all(jobs: dict[str, str]) -> None:
    for name, job_id in jobs.items():
        info = wait_for(job_id, poll_s=2, timeout_s=900)
        assert info is not None and info.state == "COMPLETED", (name, info)


@pytest.fixture(scope="module")
def matrix_runs(request, cluster, tiny_model, tmp_path_factory):
    """All strategy jobs the selected tests need at once (cpus_per_task=4: at most 4 jobs share a node),
    then the second halves of the resume cases, whose first halves stopped at step 4."""
    tmp = tmp_path_factory.mktemp("strategies")
    tests = selected(request)
    resumed_names = [n for n in RESUMED if n in tests.get("test_resume_reproduces_uninterrupted_losses", ())]
    wanted = tests.get("test_strategy_trains_and_export_reloads_with_same_eval_loss", set()) | set(resumed_names)
    if "test_hybrid_shard_groups_are_nodes" in tests:
        wanted.add("fsdp-hybrid")
    jobs = {name: submit(tmp, tiny_model, name, train) for name, train in MATRIX.items() if name in wanted}
    halves = {f"{name}-half": submit(tmp, tiny_model, f"{name}-half", {**MATRIX[name], "max_steps_this_run": 4})
              for name in resumed_names}
    if "test_seq2seq_bart_trains" in tests:
        bart = tmp / "tiny-bart"
        subprocess.run([*HPCFT, "make-tiny-model", str(bart), "--arch", "bart"], cwd=ROOT, check=True,
                       capture_output=True)
        jobs["bart"] = submit(tmp, bart, "bart", {"dataset": "samsum"})
    wait_all({**jobs, **halves})
    # Same job name, new job: resume=latest picks up the half run's checkpoint at step 4.
    resumed = {f"{name}-half#2": submit(tmp, tiny_model, f"{name}-half", {**MATRIX[name], "resume": "latest"})
               for name in resumed_names}
    wait_all(resumed)
    runs = {name: tmp / "runs" / name / job_id for name, job_id in {**jobs, **halves}.items()}
    runs.update({name: tmp / "runs" / name.split("#")[0] / job_id for name, job_id in resumed.items()})
    return runs


# Every export's eval loss, in one process (hpcft.train.evaluate's own function on each, one after another):
# a process per export cost 15 starts of torch + transformers.
EVALUATE_ALL = """
import json, sys
from hpcft.train.config import parse_args
from hpcft.train.evaluate import evaluate_saved
for name, argv in json.loads(sys.argv[1]).items():
    print(json.dumps({"name": name, "eval_loss": evaluate_saved(parse_args(argv))}), flush=True)
"""


@pytest.fixture(scope="module")
def exported_losses(matrix_runs):
    argvs = {}
    for name in (n for n in MATRIX if n in matrix_runs):
        train_cfg = json.loads((matrix_runs[name] / "train_config.json").read_text())
        argvs[name] = [f"--model_name={matrix_runs[name] / 'model'}", f"--data_path={train_cfg['data_path']}",
                       f"--val_batch_size={train_cfg['val_batch_size']}"]
    proc = run([sys.executable, "-c", EVALUATE_ALL, json.dumps(argvs)], cwd=ROOT)
    losses = {r["name"]: r["eval_loss"] for r in map(json.loads, proc.stdout.splitlines()) if "name" in r}
    return proc, losses


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.quick) if n == "fsdp-full-lora" else n
                                  for n in MATRIX])
def test_strategy_trains_and_export_reloads_with_same_eval_loss(matrix_runs, exported_losses, name):
    summary = check_run(matrix_runs[name], 2 * ranks_per_node(name))
    assert summary["strategy"] == MATRIX[name]["strategy"] and summary["steps"] == 8
    assert summary["use_peft"] == MATRIX[name].get("use_peft", False)
    if summary["use_peft"]:
        assert summary["trainable_parameters"] < summary["parameters"] / 10
        assert (matrix_runs[name] / "model" / "adapter_config.json").is_file()
    proc, losses = exported_losses
    assert name in losses, proc.stderr[-2000:]  # evaluated in order: a failure names the first export it hit
    assert losses[name] == pytest.approx(summary["eval_loss_after"], abs=1e-4)


def test_hybrid_shard_groups_are_nodes(matrix_runs):
    """HYBRID_SHARD: shard within a node, replicate across nodes (checked against where ranks ran)."""
    run_dir = matrix_runs["fsdp-hybrid"]
    hosts = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["host"] for p in run_dir.glob("rank-*.exit.json")}
    for rank in range(4):
        line = next(x for x in (run_dir / f"rank-{rank:03d}.log").read_text().splitlines() if x.startswith("hpcft.fsdp"))
        groups = json.loads(line.split(" mesh ", 1)[1])
        assert rank in groups["shard"] and len(groups["shard"]) == 2
        assert {hosts[r] for r in groups["shard"]} == {hosts[rank]}
        assert len(groups["replicate"]) == 2 and len({hosts[r] for r in groups["replicate"]}) == 2


@pytest.mark.parametrize("name", RESUMED)
def test_resume_reproduces_uninterrupted_losses(matrix_runs, name):
    straight = train_losses(matrix_runs[name] / "metrics.jsonl")
    first = train_losses(matrix_runs[f"{name}-half"] / "metrics.jsonl")
    second_dir = matrix_runs[f"{name}-half#2"]
    second = train_losses(second_dir / "metrics.jsonl")
    summary = json.loads((second_dir / "summary.json").read_text())
    assert summary["start_step"] == 4 and summary["resumed_from"].endswith("step-00000004")
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]
    for step in range(1, 9):
        assert {**first, **second}[step] == pytest.approx(straight[step], abs=1e-5), step


def test_seq2seq_bart_trains(matrix_runs):
    summary = check_run(matrix_runs["bart"], 2)
    assert summary["seq2seq"] is True
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(matrix_runs["bart"] / "model").config.model_type == "bart"
