"""Render goldens: whole texts compared; rewritten only with --update-goldens."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcft.render import render_prepare_sbatch, render_sbatch
from tests.shell import logical_lines
from hpcft.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))
MULTI_NODE_SOURCE = "the default spec (hpcft submit --dry-run)"


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.write_text(text)
    assert path.exists(), f"{path} missing; create it with: pytest tests/test_render.py --update-goldens"
    assert text == path.read_text(), f"render differs from {path}; if on purpose, rerun with --update-goldens"


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.stem)
def test_job_render_matches_golden(job, update_goldens):
    text = render_sbatch(load_spec(job), source=f"jobs/{job.name}")
    check_golden(GOLDEN / f"{job.stem}.sbatch", text, update_goldens)


def test_multi_node_slurm_is_the_render_of_the_default_spec(update_goldens):
    text = render_sbatch(load_spec(None), source=MULTI_NODE_SOURCE)
    check_golden(ROOT / "slurm" / "multi_node.slurm", text, update_goldens)


def test_counts_written_once_and_launcher_reads_slurm():
    text = (ROOT / "slurm" / "multi_node.slurm").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "--nodes=\"$SLURM_JOB_NUM_NODES\"" in body
    assert not re.search(r"gpus[-_a-z]*[=:]\s*\d", body.lower()) and "nnodes" not in body and "nproc" not in body
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in body
    # A per-task GPU request srun would read back (one GPU for the node's launcher) is dropped first.
    assert "unset SLURM_GPUS_PER_TASK SLURM_TRES_PER_TASK" in body


def test_elastic_node_range_renders_slurms_own_range(update_goldens):
    """--nodes=2-4 is the only count in the script: srun takes the granted nodes from Slurm's variables."""
    spec = load_spec(ROOT / "jobs/samsum_tiny.yaml", ["resources.nodes=2-4"])
    text = render_sbatch(spec, source="jobs/samsum_tiny.yaml with resources.nodes=2-4")
    check_golden(GOLDEN / "elastic_nodes.sbatch", text, update_goldens)
    assert "#SBATCH --nodes=2-4\n" in text
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "--nodes=\"$SLURM_JOB_NUM_NODES\"" in body and "--ntasks=\"$SLURM_JOB_NUM_NODES\"" in body
    assert not re.search(r"--n(odes|tasks)=\d", body)


def test_prepare_job_render_matches_golden_and_passes_shellcheck(update_goldens):
    """`hpcft submit --prepare`'s CPU job: one task, the prepare section's resources, the same training
    flags as the job (so its cache key is the training job's), the cache of the output directory."""
    spec = load_spec(ROOT / "jobs/chat_tiny.yaml", ["prepare.partition=cpu", "prepare.mem=16G"])
    text = render_prepare_sbatch(spec, source="jobs/chat_tiny.yaml")
    check_golden(GOLDEN / "chat_tiny.prepare.sbatch", text, update_goldens)
    body = "\n".join(logical_lines(text))
    assert "--cache-dir=runs/data-cache" in body and "--dataset=chat" in body and "--partition=cpu" in text
    assert all(arg in body.split() for arg in spec.train.to_args()) and "gpu" not in text.lower()
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout


def test_gres_and_gpu_type():
    spec = spec_from_dict({"resources": {"gpus_per_node": "h100:8", "gres": True}})
    assert "#SBATCH --gres=gpu:h100:8\n" in render_sbatch(spec)
    spec = spec_from_dict({"resources": {"gpus_per_node": "h100:8"}})
    assert "#SBATCH --gpus-per-node=h100:8\n" in render_sbatch(spec)
    spec = spec_from_dict({"resources": {"gpus_per_node": 0}})
    assert "gpu" not in "".join(line for line in render_sbatch(spec).splitlines() if line.startswith("#SBATCH"))


NASTY = ["it's", 'a "b"', "$(touch /tmp/pwned)", "`id`", "x; rm -rf /", "line1\nline2", "tab\there"]


@pytest.mark.parametrize("value", NASTY)
def test_user_values_are_quoted(value, tmp_path):
    spec = spec_from_dict({"env": {"USER_VALUE": value}, "train": {"data_path": value}})
    script = render_sbatch(spec)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert subprocess.run(["bash", "-n"], input=render_prepare_sbatch(spec), text=True).returncode == 0
    # Run only the export line: the value must arrive unchanged, nothing executed.
    export = next(line for line in logical_lines(script) if line.startswith("export USER_VALUE="))
    out = subprocess.run(["bash", "-c", export + '\nprintf %s "$USER_VALUE"'], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout == value
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.stem)
def test_rendered_scripts_pass_shellcheck(job):
    assert shutil.which("shellcheck"), "shellcheck missing: bash envs/setup.sh installs it"
    text = render_sbatch(load_spec(job), source=job.name)
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-e", "SC1090,SC1091", "-"], input=text, text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout


def test_render_is_pure(monkeypatch):
    spec = load_spec(ROOT / "jobs/samsum_tiny.yaml")
    a = render_sbatch(spec)
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    monkeypatch.chdir("/")
    assert render_sbatch(spec) == a


SITE_SPECS = {
    "container_pyxis": {"output_dir": "/scratch/me/runs", "resources": {"nodes": 2, "gpus_per_node": "h100:8"},
                        "launch": {"container": {"image": "nvcr.io#nvidia/pytorch:24.05-py3",
                                                 "mounts": ["/scratch:/scratch", "/models:/models:ro"],
                                                 "workdir": "/scratch/me"}}},
    "container_apptainer": {"output_dir": "/scratch/me/runs", "resources": {"nodes": 2, "gpus_per_node": 4},
                            "launch": {"container": {"image": "/images/train.sif", "runtime": "apptainer",
                                                     "mounts": ["/models:/models"], "python": "/opt/conda/bin/python"}}},
    "modules": {"resources": {"exclude": "gpu[07-08]", "nodelist": "gpu01", "reservation": "maint"},
                "launch": {"modules": ["cuda/12.4", "nccl/2.21"], "module_purge": True,
                           "setup": ["source ~/venvs/hpcft/bin/activate"]}},
}


@pytest.mark.parametrize("name", list(SITE_SPECS))
def test_site_renders_match_goldens_and_pass_shellcheck(name, update_goldens):
    """Containers (pyxis, apptainer), environment modules and node selection as a site needs them."""
    text = render_sbatch(spec_from_dict(SITE_SPECS[name]), source=f"the {name} spec of tests/test_render.py")
    check_golden(GOLDEN / f"{name}.sbatch", text, update_goldens)
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-e", "SC1090,SC1091", "-"], input=text,
                          text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout
    body = "\n".join(logical_lines(text)).replace(" \\\n  ", " ")
    if name == "container_pyxis":
        assert "'--container-image=nvcr.io#nvidia/pytorch:24.05-py3'" in body
        # the output directory is mounted where the host has it: the ranks write the run directory there
        assert "--container-mounts=/scratch:/scratch,/models:/models:ro " in body  # /scratch covers it already
        assert " python3 -m hpcft.launch --node" in body and "HPCFT_PYTHON" not in body.split("srun", 1)[1]
    if name == "container_apptainer":
        assert "apptainer exec --nv --bind /models:/models,/scratch/me/runs:/scratch/me/runs /images/train.sif " \
               "/opt/conda/bin/python -m hpcft.launch --node" in body
    if name == "modules":
        lines = text.splitlines()
        assert lines.index("module purge") < lines.index("module load cuda/12.4 nccl/2.21") < \
            lines.index("source ~/venvs/hpcft/bin/activate") < lines.index("set -u")
        for opt in ("--exclude=gpu[07-08]", "--nodelist=gpu01", "--reservation=maint"):
            assert f"#SBATCH {opt}\n" in text
    # requeue stays in the batch shell, outside any image (scontrol is often missing inside one)
    assert body.index('scontrol requeue "$SLURM_JOB_ID"') > body.index("srun ")


def test_sweep_renders_one_array_with_a_run_directory_per_point(update_goldens):
    import yaml

    from hpcft.render import ArrayPlan
    from hpcft.sweep import grid, split_axes

    data = yaml.safe_load((ROOT / "jobs/fsdp_lora_tiny.yaml").read_text())
    fixed, axes = split_axes(["train.lr=1e-4,3e-4", "train.lora_r=8,16", "resources.nodes=1"])
    points = grid(data, fixed, axes)
    plan = ArrayPlan(tuple((p.label, tuple(p.train_args)) for p in points), 2)
    text = render_sbatch(points[0].spec, source="jobs/fsdp_lora_tiny.yaml", array=plan)
    check_golden(GOLDEN / "sweep.sbatch", text, update_goldens)
    assert "#SBATCH --array=0-3%2\n" in text and "#SBATCH --output=runs/slurm-%A_%a.out\n" in text
    assert [p.label for p in points] == ["lr=1e-4,lora_r=8", "lr=1e-4,lora_r=16", "lr=3e-4,lora_r=8", "lr=3e-4,lora_r=16"]
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout
    # what bash makes of it, task by task: the label and the flags of that point
    case = text[text.index('case "$SLURM_ARRAY_TASK_ID"'):text.index("esac") + 4]
    for p in points:
        out = subprocess.run(["bash", "-c", f'SLURM_ARRAY_TASK_ID={p.index}\n{case}\nprintf "%s\\n" "$label" "${{args[@]}}"'],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert out == [p.label, *p.spec.train.to_args()]
