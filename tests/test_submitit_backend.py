"""The submitit backend without a cluster: the same request as the sbatch render, and the script it
prints is the one submitit writes."""
import shlex
import shutil
import sys

import pytest

from hpcft.launch import SRUN_FLAGS
from hpcft.render import GpuRequest, render_sbatch
from hpcft.render_submitit import render_submitit, submitit_folder, submitit_parameters
from hpcft.spec import spec_from_dict

submitit = pytest.importorskip("submitit")


@pytest.mark.parametrize("request_, sbatch, params", [
    (GpuRequest(4), "--gpus-per-node=4", {"gpus_per_node": 4}),
    (GpuRequest(8, "h100"), "--gpus-per-node=h100:8", {"gpus_per_node": "h100:8"}),
    (GpuRequest(8, "h100", as_gres=True), "--gres=gpu:h100:8", {"gres": "gpu:h100:8"}),
    (GpuRequest(2, as_gres=True), "--gres=gpu:2", {"gres": "gpu:2"}),
])
def test_gpu_request_reads_the_same_in_both_backends(request_, sbatch, params):
    assert request_.sbatch_option() == sbatch
    assert request_.submitit_parameters() == params
    spec = spec_from_dict({"output_dir": "/o", "resources": {
        "gpus_per_node": f"{request_.type}:{request_.count}" if request_.type else request_.count,
        "gres": request_.as_gres}})
    assert f"#SBATCH {sbatch}\n" in render_sbatch(spec)
    assert f"#SBATCH {sbatch}\n" in render_submitit(spec, python="python3")


def test_signal_requeue_and_srun_flags_follow_the_spec():
    spec = spec_from_dict({"output_dir": "/o", "launch": {"signal_lead_s": 75, "requeue": False}})
    params = submitit_parameters(spec)
    assert params["signal_delay_s"] == 75 and "additional_parameters" not in params
    assert params["srun_args"] == list(SRUN_FLAGS)
    text = render_submitit(spec, python="python3")
    assert "#SBATCH --signal=USR2@75\n" in text and "--requeue" not in text
    assert "#SBATCH --requeue\n" in render_submitit(spec_from_dict({"output_dir": "/o"}), python="python3")


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SlurmExecutor needs srun on PATH")
def test_render_is_what_the_executor_would_submit(tmp_path):
    spec = spec_from_dict({"name": "x", "output_dir": str(tmp_path / "runs"), "launch": {"setup": ["module load a"]},
                           "resources": {"nodes": 3, "gpus_per_node": "a100:4", "mem": "64G", "exclusive": True}})
    python = shlex.quote(sys.executable)
    executor = submitit.SlurmExecutor(folder=submitit_folder(spec), python=python)
    executor.update_parameters(**submitit_parameters(spec))
    expected = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert render_submitit(spec, python=python) == expected
    assert list(tmp_path.iterdir()) == []
