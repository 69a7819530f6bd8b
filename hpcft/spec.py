"""Job specs: YAML in jobs/ -> validated, frozen JobSpec.

    spec = load_spec("jobs/samsum_tiny.yaml", overrides=["train.lr=3e-4", "resources.nodes=2"])

Every field has a comment; validation is plain code that says what to change. Errors are SpecError
with the dotted field name, turned into one line and exit status 2 by the CLI.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpcft.dataformat import split_custom
from hpcft.errors import SpecError
from hpcft.train.config import TrainConfig
from hpcft.typedload import build_dataclass


# Values that go into #SBATCH lines or file names: Slurm parses those itself, so keep them plain.
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.:+,=@%-]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTLIST = re.compile(r"^[A-Za-z0-9_.\-]+(\[[0-9,\-]+\])?[A-Za-z0-9_.\-]*(,[A-Za-z0-9_.\-]+(\[[0-9,\-]+\])?[A-Za-z0-9_.\-]*)*$")
_MODULE = re.compile(r"^[A-Za-z0-9_.+/:@-]+$")
# Names that hold credentials: their values stay in the submitting shell, never in specs or scripts.
SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)


@dataclass(frozen=True)
class NodeRange:
    """Nodes to ask for: a count (min == max) or Slurm's elastic range min-max (--nodes=2-4), where
    Slurm may start the job on any count in the range and the launcher takes what was granted."""

    min: int = 1
    max: int = 1

    @classmethod
    def parse(cls, value: Any, where: str = "resources.nodes") -> "NodeRange":
        """2, "2" or "2-4" -> NodeRange; anything else is a SpecError saying how to write it."""
        if isinstance(value, NodeRange):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value)) if not isinstance(value, bool) else None
        if m is None:
            raise SpecError(where, f"write a node count such as 2 or a range such as 2-4 (got {value!r})")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if low < 1:
            raise SpecError(where, f"must be >= 1 (got {value})")
        if high < low:
            raise SpecError(where, f"a range is written min-max with min <= max (got {value}); e.g. {high}-{low}")
        return cls(low, high)

    @property
    def elastic(self) -> bool:
        return self.max != self.min

    def counts(self) -> range:
        """Every node count Slurm may grant."""
        return range(self.min, self.max + 1)

    def __str__(self) -> str:
        return f"{self.min}-{self.max}" if self.elastic else str(self.min)


@dataclass(frozen=True)
class Resources:
    """What the job asks Slurm for. Counts live here only; launchers read them back from Slurm."""

    nodes: NodeRange = field(default_factory=NodeRange)  # --nodes: a count (2) or an elastic range (2-4)
    gpus_per_node: int = 1  # GPUs per node; on a node without CUDA, CPU ranks per node
    gpu_type: str | None = None  # e.g. "a100"; YAML may write gpus_per_node: "a100:4"
    gres: bool = False  # ask as --gres=gpu[:type]:N instead of --gpus-per-node
    cpus_per_task: int = 4  # CPUs for the one launcher task on each node (shared by its ranks)
    mem: str | None = None  # memory per node as Slurm writes it: "64G", "0" for all
    time: str = "01:00:00"  # wall-clock limit: MM, HH:MM:SS or D-HH:MM:SS
    partition: str | None = None  # -p/--partition
    account: str | None = None  # -A/--account
    qos: str | None = None  # --qos
    constraint: str | None = None  # -C/--constraint, e.g. "a100&ib"
    exclusive: bool = False  # --exclusive: whole nodes only
    exclude: str | None = None  # -x/--exclude: nodes never to use, a Slurm hostlist such as "gpu[07-08]"
    nodelist: str | None = None  # -w/--nodelist: nodes the job must include, e.g. "gpu[01-02]"
    reservation: str | None = None  # --reservation: run inside this reservation


CONTAINER_RUNTIMES = ("pyxis", "apptainer")


@dataclass(frozen=True)
class Container:
    """An image every node's launcher (and so every rank) runs in. The batch script itself stays on the
    host: it requeues with scontrol, which images often lack; inside, the launcher takes the hosts from
    SLURM_JOB_NODELIST without scontrol."""

    image: str = ""  # pyxis: an enroot image or docker:// URI (nvcr.io#nvidia/pytorch:24.05-py3); apptainer: a .sif
    runtime: str = "pyxis"  # pyxis (srun --container-image, enroot) or apptainer (apptainer exec --nv)
    mounts: tuple[str, ...] = ()  # SRC:DST[:OPTS] each; mount the run's output_dir, data and model if outside the image
    workdir: str | None = None  # working directory inside the container
    python: str = "python3"  # the interpreter inside the image that has hpcft, torch and the rest


@dataclass(frozen=True)
class Launch:
    """How ranks are started on the allocation."""

    backend: str = "sbatch"  # "sbatch" (render + sbatch) or "submitit"
    rdzv_port: int | None = None  # fixed rendezvous port; default derives one from the job id
    modules: tuple[str, ...] = ()  # environment modules loaded first in the batch script (module load ...)
    module_purge: bool = False  # `module purge` before loading them
    container: Container | None = None  # run the ranks in this image (launch.container.image, .runtime, .mounts)
    setup: tuple[str, ...] = ()  # shell lines run first in the batch script (source a venv, export ...)
    command: tuple[str, ...] = ()  # a torchrun-ready script and its args; empty: hpcft's entrypoint
    signal_lead_s: int = 120  # Slurm warns this long before the time limit (USR1; submitit: USR2): ranks checkpoint and stop (0: off)
    requeue: bool = True  # after such a stop, the job requeues itself and resumes from the checkpoint


@dataclass(frozen=True)
class Prepare:
    """The CPU job `hpcft submit --prepare` queues first: it tokenizes the data into the shared cache,
    and the training job starts only after it succeeded (afterok), on a cache hit."""

    cpus_per_task: int = 8  # tokenizing processes (one node, one task)
    mem: str | None = None  # memory for it, as Slurm writes it; default: the partition's default
    time: str = "01:00:00"  # its wall-clock limit
    partition: str | None = None  # e.g. a CPU partition; default: resources.partition


@dataclass(frozen=True)
class JobSpec:
    """One fine-tuning job: resources, launch, training config, environment, output place."""

    name: str = "hpcft"  # job name; also the run directory's parent: <output_dir>/<name>/<job-id>
    output_dir: str = "runs"  # where run directories go (relative paths: to the submit directory)
    resources: Resources = field(default_factory=Resources)
    launch: Launch = field(default_factory=Launch)
    train: TrainConfig = field(default_factory=TrainConfig)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job before launch
    prepare: Prepare = field(default_factory=Prepare)  # the data-preparation job of `hpcft submit --prepare`

    def replace(self, **changes: Any) -> "JobSpec":
        return dataclasses.replace(self, **changes)


def _parse_gpus(value: Any) -> tuple[Any, Any]:
    """'a100:4' -> (4, 'a100'); 4 -> (4, None)."""
    if isinstance(value, str) and ":" in value:
        gpu_type, _, count = value.rpartition(":")
        return count, gpu_type
    return value, None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003). Values are read as YAML scalars."""
    key, sep, raw = item.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
        raise SpecError(item, "overrides are written key=value with a dotted key, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def spec_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    if data is not None and not isinstance(data, dict):
        raise SpecError("spec", "the file must hold a YAML mapping")
    data = _deep_copy(dict(data or {}))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    res = data.get("resources")
    if isinstance(res, dict) and "nodes" in res:
        res["nodes"] = dataclasses.asdict(NodeRange.parse(res["nodes"]))
    if isinstance(res, dict) and "gpus_per_node" in res:
        count, gpu_type = _parse_gpus(res["gpus_per_node"])
        res["gpus_per_node"] = count
        if gpu_type is not None:
            res["gpu_type"] = gpu_type
    spec = build_dataclass(JobSpec, data)
    validate_spec(spec)
    return spec


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML itself keeps the last one,
    silently), naming the key's dotted path and both lines."""

    def __init__(self, stream: str, name: str):
        super().__init__(stream)
        self.name = name
        self._where: dict[int, str] = {}  # id(mapping node) -> its dotted path

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        prefix = self._where.get(id(node), "")
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            dotted = f"{prefix}{key}"
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SpecError(dotted, f"written twice in {self.name} (lines {seen[key]} and {line}); keep one")
            seen[key] = line
            if isinstance(value_node, yaml.MappingNode):
                self._where[id(value_node)] = dotted + "."
        return super().construct_mapping(node, deep=deep)


def read_spec_file(path: Path) -> dict:
    """The YAML mapping of a spec file: a syntax error, a duplicate key, an empty file or a top level
    that is not a mapping is a SpecError."""
    loader = _SpecLoader(path.read_text(), str(path))
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError("spec", f"{path} is not valid YAML{at}; fix the syntax") from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError("spec", f"{path} is empty; write the job in it (e.g. copy jobs/samsum_tiny.yaml), "
                                "or leave the spec out for the defaults")
    if not isinstance(data, dict):
        raise SpecError("spec", f"{path} must hold a YAML mapping with keys like resources:, train: "
                                f"(its top level is a {type(data).__name__})")
    return data


def load_spec(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job spec (None: the defaults) and apply dotted key=value overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SpecError("spec", f"no such file {str(p)!r}; pass a YAML file such as jobs/samsum_tiny.yaml")
        data = read_spec_file(p)
    return spec_from_dict(data, overrides)


# ---------------------------------------------------------------------------------------------
# Validation.


def time_to_minutes(value: str) -> int:
    """Slurm time strings: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS. Slurm itself accepts
    25:99:99 and carries the excess over; we refuse it (ValueError saying which part is out of range),
    since such a value is almost always a typo."""
    m = _TIME.match(value)
    if not m:
        raise ValueError(f"write a Slurm time such as 30, 02:00:00 or 1-00:00:00 (got {value!r})")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mnt, s = (nums + [0, 0, 0])[:3]
        bounded = {"hours": h, "minutes": mnt, "seconds": s}
    elif len(nums) == 1:
        h, mnt, s = 0, nums[0], 0
        bounded = {}
    elif len(nums) == 2:
        h, mnt, s = 0, nums[0], nums[1]
        bounded = {"seconds": s}
    else:
        h, mnt, s = nums
        bounded = {"minutes": mnt, "seconds": s}
    for part, n in bounded.items():
        limit = 24 if part == "hours" else 60
        if n >= limit:
            raise ValueError(f"{part} must be < {limit} in {value!r}; write e.g. 02:00:00 or 1-12:00:00")
    return int(days or 0) * 1440 + h * 60 + mnt + (1 if s else 0)


def validate_spec(spec: JobSpec) -> None:
    r = spec.resources
    if not _NAME.match(spec.name):
        raise SpecError("name", f"use letters, digits, '.', '_' and '-' only, starting with a letter or digit (got {spec.name!r})")
    if not spec.output_dir or any(c in '"%\\' or ord(c) < 32 or ord(c) == 127 for c in spec.output_dir):
        raise SpecError("output_dir", "goes into #SBATCH --output, which Slurm parses itself: use a path without "
                                      f"double quotes, %, backslashes or control characters (got {spec.output_dir!r})")
    if not 1 <= r.nodes.min <= r.nodes.max:
        raise SpecError("resources.nodes", f"write a node count such as 2 or a range such as 2-4 (got {r.nodes})")
    if r.gpus_per_node < 0:
        raise SpecError("resources.gpus_per_node", f"must be >= 0 (got {r.gpus_per_node})")
    if r.gpu_type is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", r.gpu_type):
        raise SpecError("resources.gpu_type", f"must be a plain GPU type such as a100 (got {r.gpu_type!r})")
    if r.gpus_per_node == 0 and (r.gpu_type or r.gres):
        raise SpecError("resources.gpus_per_node", "is 0 but a GPU type or gres was asked for; set a count such as a100:4")
    if r.cpus_per_task < 1:
        raise SpecError("resources.cpus_per_task", f"must be >= 1 (got {r.cpus_per_task})")
    if r.mem is not None and not _MEM.match(r.mem):
        raise SpecError("resources.mem", f"write memory as Slurm does, e.g. 64G or 0 (got {r.mem!r})")
    try:
        minutes = time_to_minutes(r.time)
    except ValueError as exc:
        raise SpecError("resources.time", str(exc)) from None
    if minutes < 1:
        raise SpecError("resources.time", f"must be at least one minute (got {r.time!r})")
    _validate_prepare(spec.prepare)
    for key in ("partition", "account", "qos", "constraint", "reservation"):
        value = getattr(r, key)
        if value is not None and (key == "constraint" and not re.fullmatch(r"[A-Za-z0-9_.&|\[\]*()!:-]+", value)
                                  or key != "constraint" and not _SLURM_WORD.match(value)):
            raise SpecError(f"resources.{key}", f"must be a plain Slurm name without spaces or quotes (got {value!r})")
    for key in ("exclude", "nodelist"):
        value = getattr(r, key)
        if value is not None and not _HOSTLIST.match(value):
            raise SpecError(f"resources.{key}", f"write a Slurm hostlist such as gpu[01-04],gpu07 (got {value!r})")
    ln = spec.launch
    if ln.backend not in ("sbatch", "submitit"):
        raise SpecError("launch.backend", f"must be sbatch or submitit (got {ln.backend!r})")
    if ln.backend == "submitit" and r.nodes.elastic:
        # submitit counts a job's tasks as nodes x tasks per node when it submits: it needs one number.
        raise SpecError("resources.nodes", f"a node range ({r.nodes}) needs launch.backend sbatch; submitit "
                                           "takes a single node count")
    if ln.rdzv_port is not None and not 1024 <= ln.rdzv_port <= 65535:
        raise SpecError("launch.rdzv_port", f"must be between 1024 and 65535 (got {ln.rdzv_port})")
    if ln.signal_lead_s < 0:
        raise SpecError("launch.signal_lead_s", f"must be >= 0 seconds (got {ln.signal_lead_s})")
    if ln.signal_lead_s and ln.signal_lead_s >= minutes * 60:
        raise SpecError("launch.signal_lead_s", f"{ln.signal_lead_s} s is not before the end of a {r.time} job; "
                                                "lower it or raise resources.time")
    for i, line in enumerate(ln.setup):
        if "\n" in line:
            raise SpecError(f"launch.setup[{i}]", "one shell line per list item, without newlines")
    for i, name in enumerate(ln.modules):
        if not _MODULE.match(name):
            raise SpecError(f"launch.modules[{i}]", f"a module name such as cuda/12.4 or nccl (got {name!r})")
    if ln.container is not None:
        _validate_container(ln.container, ln.backend)
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name):
            raise SpecError(f"env.{name}", "environment variable names use letters, digits and _ and do not start with a digit")
        if SECRET_NAME.search(name):
            raise SpecError(f"env.{name}", "looks like a secret: keep it out of the spec and export it in the shell "
                                           "you submit from; the job gets it by name, never written down")
        if "\x00" in value:
            raise SpecError(f"env.{name}", "contains a NUL byte, which no environment can hold")
    for dotted, value in (("output_dir", spec.output_dir), ("train.model_name", spec.train.model_name),
                         ("train.data_path", spec.train.data_path)):
        if "\x00" in value:
            raise SpecError(dotted, "contains a NUL byte; use a plain path")
    spec.train.validate()


def _validate_container(c: Container, backend: str) -> None:
    if not c.image or any(ch.isspace() or ch in "'\"" for ch in c.image):
        raise SpecError("launch.container.image", f"name an image without spaces or quotes, e.g. "
                                                  f"nvcr.io#nvidia/pytorch:24.05-py3 or /images/train.sif (got {c.image!r})")
    if c.runtime not in CONTAINER_RUNTIMES:
        raise SpecError("launch.container.runtime", f"must be one of {', '.join(CONTAINER_RUNTIMES)} (got {c.runtime!r})")
    for i, mount in enumerate(c.mounts):
        parts = mount.split(":")
        if not 1 <= len(parts) <= 3 or not all(parts[:2]) or any(ch.isspace() or ch in ",'\"" for ch in mount):
            raise SpecError(f"launch.container.mounts[{i}]", f"write SRC[:DST[:OPTS]] without spaces or commas (got {mount!r})")
    if backend == "submitit":
        raise SpecError("launch.container", "runs with launch.backend sbatch; submitit starts its own python on "
                                            "the nodes, outside any image")


def _validate_prepare(p: Prepare) -> None:
    if p.cpus_per_task < 1:
        raise SpecError("prepare.cpus_per_task", f"must be >= 1 (got {p.cpus_per_task})")
    if p.mem is not None and not _MEM.match(p.mem):
        raise SpecError("prepare.mem", f"write memory as Slurm does, e.g. 16G (got {p.mem!r})")
    try:
        time_to_minutes(p.time)
    except ValueError as exc:
        raise SpecError("prepare.time", str(exc)) from None
    if p.partition is not None and not _SLURM_WORD.match(p.partition):
        raise SpecError("prepare.partition", f"must be a plain Slurm name without spaces or quotes (got {p.partition!r})")


# ---------------------------------------------------------------------------------------------
# Paths: relative to where the user submits.


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Relative paths in the spec are relative to where the user submits; make them absolute so
    the job finds them whatever its working directory."""
    t = spec.train
    resume = t.resume if t.resume in ("auto", "latest", "never") else _absolute(t.resume, base)
    custom = t.custom_dataset
    if custom:
        loader, func = split_custom(custom)
        custom = f"{_absolute(str(loader), base)}:{func}"
    template = t.chat_template if t.chat_template is None or "{" in t.chat_template else _absolute(t.chat_template, base)
    launch = spec.launch
    c = launch.container
    if c is not None:
        # Paths on the host are relative to where the user submits; image references (docker://,
        # nvcr.io#...) and paths inside the image are left alone.
        image = _absolute(c.image, base) if (base / c.image).exists() and "://" not in c.image else c.image
        mounts = tuple(":".join([_absolute(m.split(":")[0], base), *m.split(":")[1:]]) if ":" in m
                       else f"{_absolute(m, base)}:{_absolute(m, base)}" for m in c.mounts)
        launch = dataclasses.replace(launch, container=dataclasses.replace(c, image=image, mounts=mounts))
    train = dataclasses.replace(
        t, model_name=_absolute(t.model_name, base), tokenizer_name=_absolute(t.tokenizer_name, base),
        data_path=_absolute(t.data_path, base), eval_data_path=_absolute(t.eval_data_path, base),
        deepspeed_config=_absolute(t.deepspeed_config, base), resume=resume, custom_dataset=custom,
        chat_template=template, data_cache_dir=_absolute(t.data_cache_dir, base),
        export_dir=_absolute(t.export_dir, base), profiler_dir=_absolute(t.profiler_dir, base))
    return spec.replace(output_dir=_absolute(spec.output_dir, base), train=train, launch=launch)
