"""Requests the cluster can never run are refused at submit time, naming the field (sinfo's answer
given here as data; tests/integration checks the same against the real local cluster)."""
import pytest

from hpcft.errors import SpecError
from hpcft.jobs import NodeInfo, parse_gres_gpus, parse_gres_types
from hpcft.spec import spec_from_dict
from hpcft.submit import check_capacity

CLUSTER = [NodeInfo("n1", 16, 4, 16000, ("debug", "<default>"), "idle"),
           NodeInfo("n2", 16, 4, 16000, ("debug", "<default>"), "idle"), NodeInfo("g1", 64, 8, 512000, ("big",), "idle", ("a100",))]


@pytest.mark.parametrize("gres, count", [("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:2", 4),
                                         ("(null)", 0)])
def test_parse_gres(gres, count):
    assert parse_gres_gpus(gres) == count


@pytest.mark.parametrize("resources, field", [
    ({"nodes": 3}, "resources.nodes"),
    ({"gpus_per_node": 5}, "resources.gpus_per_node"),
    ({"cpus_per_task": 17}, "resources.cpus_per_task"),
    ({"partition": "gpu"}, "resources.partition"),
    ({"partition": "big", "nodes": 2}, "resources.nodes"),
    ({"mem": "64G"}, "resources.mem"),
    ({"nodes": "3-4"}, "resources.nodes"),  # a range runs once its minimum fits
    ({"partition": "big", "gpus_per_node": "h100:8"}, "resources.gpu_type"),
    ({"gpus_per_node": "a100:4"}, "resources.gpu_type"),  # debug's nodes list no GPU types
])
def test_over_capacity_names_the_field(resources, field):
    with pytest.raises(SpecError) as exc:
        check_capacity(spec_from_dict({"resources": resources}), CLUSTER)
    assert exc.value.field == field


@pytest.mark.parametrize("gres, types", [("gpu:4", ()), ("gpu:a100:4(S:0-1)", ("a100",)),
                                         ("gpu:a100:2,gpu:v100:2", ("a100", "v100")), ("(null)", ())])
def test_parse_gres_types(gres, types):
    assert parse_gres_types(gres) == types


def test_unknown_gpu_type_names_the_types_there():
    with pytest.raises(SpecError, match="no node in partition big has h100 GPUs .GPU types there: a100"):
        check_capacity(spec_from_dict({"resources": {"partition": "big", "gpus_per_node": "h100:8"}}), CLUSTER)


def test_fitting_requests_pass():
    check_capacity(spec_from_dict({"resources": {"nodes": "2-5", "gpus_per_node": 4}}), CLUSTER)
    check_capacity(spec_from_dict({"resources": {"partition": "big", "gpus_per_node": "a100:8"}}), CLUSTER)
    check_capacity(spec_from_dict({"resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 16}}), CLUSTER)
    check_capacity(spec_from_dict({"resources": {"partition": "big", "gpus_per_node": 8, "mem": "400G"}}), CLUSTER)
    check_capacity(spec_from_dict({"resources": {"mem": "0"}}), CLUSTER)
    check_capacity(spec_from_dict({"resources": {"nodes": 99}}), None)  # no sinfo: sbatch decides
