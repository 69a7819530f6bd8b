"""What a data path is and how `datasets` reads it (no torch; `datasets` is imported only to read).

    train.data_path: data/train.jsonl          JSON lines (or .json, .csv, .parquet, .arrow, .txt)
    train.data_path: "data/mix/*.parquet"      several files of one type (a data mix)
    train.data_path: data/saved                a directory written by Dataset.save_to_disk (or a DatasetDict's)
    train.data_path: data/my_dataset           a local directory in the layout load_dataset(path) reads
                                               (data files, train/validation by file name, or a README's configs)

    src = describe("data/train.jsonl")
    splits = load_splits(src, cache_dir)       # {"train": Dataset, ...}, memory-mapped Arrow
    rows, columns = preview(src, 2000)         # the first examples, for the login-node check
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from hpcft.dataformat import read_jsonl
from hpcft.errors import SpecError

# file suffix -> datasets' packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
            ".arrow": "arrow", ".txt": "text"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")  # read as UTF-8 text: checked byte by byte first
# A split for evaluation when the data brings its own, in order of preference ("test" only for eval_data_path).
EVAL_SPLITS = ("validation", "valid", "val", "eval", "dev")


@dataclass(frozen=True)
class Source:
    """A data path, resolved: what kind it is and the files whose content makes it."""

    path: str  # as given (a file, a glob, or a directory)
    kind: str  # "files" (with builder), "saved" (save_to_disk), "directory" (load_dataset layout)
    files: tuple[Path, ...]  # every file the content comes from, sorted
    builder: str | None = None  # json, csv, parquet, arrow, text (kind "files")

    @property
    def text_files(self) -> tuple[Path, ...]:
        return tuple(f for f in self.files if f.suffix.lower() in TEXT_SUFFIXES)


def _fix(field: str) -> str:
    return (f"point {field} at a .jsonl/.json/.csv/.parquet/.arrow/.txt file, a glob of them, a directory "
            "written by save_to_disk, or a directory load_dataset can read")


def _files_under(d: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in d.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(d).parts)))


def describe(path: str, field: str = "train.data_path") -> Source:
    """The Source at `path`, or a SpecError naming the field and what it accepts."""
    if any(c in path for c in "*?["):
        files = tuple(sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file()))
        if not files:
            raise SpecError(field, f"no files match {path}; {_fix(field)}")
        kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise SpecError(field, f"{path} matches files of several or unknown types "
                                   f"({', '.join(sorted({f.suffix or f.name for f in files}))}); match one type")
        return Source(path, "files", files, kinds.pop())
    p = Path(path)
    if p.is_file():
        builder = BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise SpecError(field, f"{path}: unknown file type {p.suffix or '(none)'}; {_fix(field)}")
        return Source(path, "files", (p,), builder)
    if p.is_dir():
        files = _files_under(p)
        if not files:
            raise SpecError(field, f"{path} is an empty directory; {_fix(field)}")
        saved = (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
        return Source(path, "saved" if saved else "directory", files)
    raise SpecError(field, f"no such file or directory {path}; {_fix(field)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _builder_options(src: Source) -> dict:
    """Options of datasets' packaged builders that our file types need."""
    if src.builder == "text":
        return {"sample_by": "paragraph"}  # one example per paragraph, not per line
    if src.files[0].suffix.lower() == ".tsv":
        return {"delimiter": "\t"}
    return {}


def _read(src: Source, field: str, reader):
    """Run a datasets reader, turning whatever it raises on unreadable data into one SpecError line
    (datasets' own log lines and progress bars would repeat it over several)."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        return reader()
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets and pyarrow raise many types for unreadable data
        raise SpecError(field, f"datasets cannot read {src.path}: {_first_line(exc)}") from None


def load_splits(src: Source, cache_dir: Path, field: str = "train.data_path") -> dict:
    """Every split of the source as a `datasets.Dataset` ({"train": ...} for plain files): Arrow,
    memory-mapped; datasets' own conversion files go to cache_dir."""
    import datasets

    def reader():
        if src.kind == "saved":
            return datasets.load_from_disk(src.path)
        if src.kind == "files":
            return datasets.load_dataset(src.builder, data_files=[str(f) for f in src.files],
                                         cache_dir=str(cache_dir), **_builder_options(src))
        return datasets.load_dataset(src.path, cache_dir=str(cache_dir))

    loaded = _read(src, field, reader)
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def preview(src: Source, n: int, field: str = "train.data_path") -> tuple[list[dict], list[str]]:
    """The first n examples of the split training reads and the column names, as the login node checks
    them: JSONL through read_jsonl (errors name the line), everything else through datasets, streamed."""
    if src.kind == "files" and all(f.suffix.lower() == ".jsonl" for f in src.files):
        rows = read_jsonl(src.files[0], field, limit=n)
        return rows, list(dict.fromkeys(k for r in rows for k in r))
    import datasets

    def reader():
        if src.kind == "saved":
            loaded = datasets.load_from_disk(src.path)
            ds = loaded if isinstance(loaded, datasets.Dataset) else loaded[train_split(list(loaded), field, src.path)]
            return ds.select(range(min(n, len(ds)))).to_list()
        if src.kind == "files":
            stream = datasets.load_dataset(src.builder, data_files=[str(f) for f in src.files], split="train",
                                           streaming=True, **_builder_options(src))
        else:
            loaded = datasets.load_dataset(src.path, streaming=True)
            stream = loaded[train_split(list(loaded), field, src.path)]
        return list(stream.take(n))

    rows = _read(src, field, reader)
    if not rows:
        raise SpecError(field, f"{src.path} holds no examples")
    return rows, list(dict.fromkeys(k for r in rows for k in r))


def train_split(names: list[str], field: str, path: str) -> str:
    """The split to train on: "train", or the only one there is."""
    if "train" in names:
        return "train"
    if len(names) == 1:
        return names[0]
    raise SpecError(field, f"{path} has splits {', '.join(names)} and none is named train; name one train")


def eval_split(names: list[str], *, own: bool) -> str | None:
    """The split to evaluate on: from data_path's own splits (own=False: a validation-like one, else
    none), or from eval_data_path (own=True: the only split, else a validation-like one, test, train)."""
    if own and len(names) == 1:
        return names[0]
    for name in EVAL_SPLITS + (("test", "train") if own else ()):
        if name in names:
            return name
    return None
