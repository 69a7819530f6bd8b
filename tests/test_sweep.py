"""Sweeps, job chains and the runs table without a cluster."""
import json

import pytest

from hpcft.errors import SpecError
from hpcft.submit import dependency_args, parse_after
from hpcft.sweep import grid, report_plot, report_rows, split_axes

SPEC = {"name": "sw", "train": {"lr": 1e-4, "use_peft": True}}


def test_axes_and_fixed_overrides():
    fixed, axes = split_axes(["train.lr=1e-4,3e-4", "train.lora_r=8,16,32", "resources.time=02:00:00",
                              "train.lora_target_modules=[q_proj,v_proj]"])
    assert fixed == ["resources.time=02:00:00", "train.lora_target_modules=[q_proj,v_proj]"]
    assert [(a.key, a.values) for a in axes] == [("train.lr", ("1e-4", "3e-4")), ("train.lora_r", ("8", "16", "32"))]
    points = grid(SPEC, fixed, axes)
    assert len(points) == 6 and points[5].label == "lr=3e-4,lora_r=32"
    assert points[5].spec.train.lr == 3e-4 and points[5].spec.train.lora_r == 32
    assert points[0].spec.resources.time == "02:00:00" and points[0].spec.train.lora_target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("items,field,message", [
    (["resources.nodes=1,2"], "resources.nodes", "varies train.* fields only"),
    (["train.lr=1e-4"], "sweep", "at least one axis with two or more values"),
    (["train.lr=1e-4,1e-4"], "train.lr", "distinct"),
    (["train.lr=1e-4,3e-4", "train.lr=5e-4,6e-4"], "train.lr", "given twice"),
])
def test_bad_axes(items, field, message):
    with pytest.raises(SpecError, match=message) as exc:
        split_axes(items)
    assert exc.value.field == field


def test_a_bad_value_names_its_point():
    _, axes = split_axes(["train.lr=1e-4,-1", "train.lora_r=8,16"])
    with pytest.raises(SpecError, match=r"train.lr: must be > 0 \(got -1.0\) \(sweep point 2: train.lr=-1, train.lora_r=8\)"):
        grid(SPEC, [], axes)


def test_after_becomes_slurm_dependencies():
    known = {"123": True, "456": True, "789": False}.get
    assert parse_after(["123", "456:afterany", "123_4:afternotok"], known=lambda j: known(j, True)) == [
        "afterok:123", "afterany:456", "afternotok:123_4"]
    assert dependency_args(["afterok:123", "afterany:456"]) == ["--dependency=afterok:123,afterany:456",
                                                                "--kill-on-invalid-dep=yes"]
    with pytest.raises(SpecError, match="--after: Slurm knows no job 789"):
        parse_after(["789"], known=known)
    with pytest.raises(SpecError, match="write JOB or JOB:afterok|afterany|afternotok"):
        parse_after(["123:after"], known=known)


def test_report_rows_and_plot_from_the_tasks_summaries(tmp_path):
    from hpcft.paths import sweep_task_dir

    man = {"job": "900", "points": [{"task": i, "label": f"lr={lr}", "overrides": {"train.lr": lr}}
                                    for i, lr in enumerate(["1e-4", "3e-4"])]}
    run = sweep_task_dir(tmp_path, "sw", "900", 1, "lr=3e-4")
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 8, "total_steps": 8, "final_train_loss": 2.5,
                                                 "eval_loss_after": 2.75, "tokens_per_s": 1234.5}))
    rows = report_rows(man, tmp_path, "sw", {0: "FAILED", 1: "COMPLETED"})
    assert [(r.state, r.steps, r.eval_loss) for r in rows] == [("FAILED", "-", None), ("COMPLETED", "8/8", 2.75)]
    png = report_plot(rows, tmp_path / "p.png", "900")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_table_reads_state_from_the_files(tmp_path):
    from hpcft.runtable import find_runs, run_row

    done = tmp_path / "job" / "10"
    failed = tmp_path / "job" / "11"
    for d in (done, failed):
        d.mkdir(parents=True)
        (d / "train_config.json").write_text("{}")
    (done / "summary.json").write_text(json.dumps({"finished": True, "world_size": 4, "steps": 12, "total_steps": 12,
                                                  "eval_loss_before": 7.5, "eval_loss_after": 3.25, "tokens_per_s": 900.0,
                                                  "mfu": 0.41, "step_time_per_rank": [{"host": "node1"}, {"host": "node2"}]}))
    (failed / "rank-000.exit.json").write_text(json.dumps({"rank": 0, "returncode": 1}))
    (tmp_path / "data-cache").mkdir()
    rows = [run_row(d) for d in find_runs(tmp_path)]
    assert [r.cells()[:8] for r in rows] == [
        ("10", "job", "COMPLETED", "4 (2 nodes)", "12/12", "7.5000 -> 3.2500", "900", "41.0%"),
        ("11", "job", "FAILED", "-", "-", "-", "-", "-")]
