from pathlib import Path

import pytest

from hpcft.errors import SpecError
from hpcft.spec import JobSpec, NodeRange, load_spec, spec_from_dict, time_to_minutes

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def test_there_are_job_files():
    assert len(JOB_FILES) >= 2


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_file_loads_and_starts_with_its_command(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hpcft submit") and path.name in first, first


def test_defaults():
    spec = load_spec(None)
    assert spec.resources.nodes == NodeRange(1, 1) and spec.train.strategy == "ddp" and spec.launch.backend == "sbatch"


def test_gpu_type_in_count():
    spec = spec_from_dict({"resources": {"gpus_per_node": "a100:4"}})
    assert (spec.resources.gpus_per_node, spec.resources.gpu_type) == (4, "a100")
    assert spec_from_dict({"resources": {"gpus_per_node": 8}}).resources.gpu_type is None


def test_overrides_dotted_and_typed():
    spec = load_spec(ROOT / "jobs/samsum_tiny.yaml",
                     ["train.lr=3e-4", "resources.nodes=4", "resources.exclusive=true", "env.FOO=bar baz"])
    assert spec.train.lr == pytest.approx(3e-4)
    assert spec.resources.nodes == NodeRange(4, 4) and spec.resources.exclusive is True
    assert spec.env == {"FOO": "bar baz"}


def test_spec_is_frozen():
    spec = load_spec(None)
    with pytest.raises(Exception):
        spec.resources.nodes = 3  # type: ignore[misc]


@pytest.mark.parametrize("data, field", [
    ({"resources": {"nodes": 0}}, "resources.nodes"),
    ({"resources": {"nodes": "two"}}, "resources.nodes"),
    ({"resources": {"nodez": 2}}, "resources.nodez"),
    ({"resources": {"gpus_per_node": -1}}, "resources.gpus_per_node"),
    ({"resources": {"time": "forever"}}, "resources.time"),
    ({"resources": {"mem": "lots"}}, "resources.mem"),
    ({"resources": {"partition": "gpu; rm -rf /"}}, "resources.partition"),
    ({"resources": {"exclusive": "maybe"}}, "resources.exclusive"),
    ({"launch": {"backend": "ssh"}}, "launch.backend"),
    ({"launch": {"rdzv_port": 80}}, "launch.rdzv_port"),
    ({"train": {"strategy": "tp"}}, "train.strategy"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"batch_size_training": 0}}, "train.batch_size_training"),
    ({"train": {"val_fraction": 1.5}}, "train.val_fraction"),
    ({"name": "has space"}, "name"),
    ({"env": {"1BAD": "x"}}, "env.1BAD"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(SpecError) as exc:
        spec_from_dict(data)
    assert exc.value.field == field
    assert "\n" not in str(exc.value)


def test_unknown_key_suggests_close_one():
    with pytest.raises(SpecError, match="did you mean lr"):
        spec_from_dict({"train": {"lrr": 1}})


def test_bad_override_syntax():
    with pytest.raises(SpecError):
        load_spec(None, ["train.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


@pytest.mark.parametrize("text, minutes", [("30", 30), ("02:00:00", 120), ("1-00:00:00", 1440), ("10:30", 11),
                                           ("0-01", 60)])
def test_time_to_minutes(text, minutes):
    assert time_to_minutes(text) == minutes


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ("3", (3, 3)), ("2-4", (2, 4)), ("1-1", (1, 1))])
def test_node_count_or_elastic_range(value, expected):
    nodes = spec_from_dict({"resources": {"nodes": value}}).resources.nodes
    assert (nodes.min, nodes.max) == expected
    assert str(nodes) == (str(expected[0]) if expected[0] == expected[1] else f"{expected[0]}-{expected[1]}")
    assert load_spec(None, [f"resources.nodes={value}"]).resources.nodes == nodes


@pytest.mark.parametrize("value", ["0", "0-2", "4-2", "2-", "two", "2-4-6", True])
def test_bad_node_ranges(value):
    with pytest.raises(SpecError) as exc:
        spec_from_dict({"resources": {"nodes": value}})
    assert exc.value.field == "resources.nodes"


def test_node_range_needs_the_sbatch_backend():
    with pytest.raises(SpecError, match="submitit takes a single node count") as exc:
        spec_from_dict({"resources": {"nodes": "2-4"}, "launch": {"backend": "submitit"}})
    assert exc.value.field == "resources.nodes"


@pytest.mark.parametrize("value, minutes", [("90", 90), ("10:30", 11), ("30:00:00", 1800), ("1-02", 1560),
                                            ("1-02:30", 1590), ("1-23:59:59", 2880)])
def test_time_forms(value, minutes):
    assert time_to_minutes(value) == minutes


@pytest.mark.parametrize("value", ["25:99:99", "01:60:00", "10:60", "1-24", "1-00:60", "1-00:00:60"])
def test_times_slurm_would_carry_over_are_refused(value):
    with pytest.raises(SpecError, match="must be < ") as exc:
        spec_from_dict({"resources": {"time": value}, "launch": {"signal_lead_s": 0}})
    assert exc.value.field == "resources.time"


def test_duplicate_key_names_its_path_and_lines(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\ntrain:\n  lr: 1e-4\n  seed: 3\n  lr: 2e-4\n")
    with pytest.raises(SpecError, match=r"lines 3 and 5") as exc:
        load_spec(p)
    assert exc.value.field == "train.lr"


@pytest.mark.parametrize("text, message", [("", "is empty"), ("# nothing here\n", "is empty"),
                                           ("- a\n- b\n", "top level is a list"), ("just words\n", "top level is a str")])
def test_empty_or_non_mapping_spec_file(tmp_path, text, message):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=message) as exc:
        load_spec(p)
    assert exc.value.field == "spec"
