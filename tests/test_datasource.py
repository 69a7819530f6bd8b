"""Every data format users bring, read through `datasets`: the same examples tokenize the same way
whatever the file type, directories bring their own eval split, and a bad path is one clear line."""
import json

import pytest

from hpcft.datasource import describe, preview
from hpcft.errors import SpecError
from hpcft.prepare import prepare
from hpcft.train.config import TrainConfig
from hpcft.train.data import load_splits
from hpcft.train.packing import TokenStore

ROWS = [{"dialogue": f"A: meet at {h}:00?\nB: yes, see you.", "summary": f"A and B meet at {h}:00."} for h in range(30)]
VAL = [{"dialogue": f"C: lunch at {h}?\nD: sure.", "summary": f"C and D have lunch at {h}."} for h in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokens(tiny_model, data_path, cache, **kw):
    cfg = TrainConfig(model_name=str(tiny_model), data_path=str(data_path), **kw)
    done = prepare(cfg, cache, log=lambda _: None)
    store = TokenStore(done.train.path)
    ev = TokenStore(done.eval.path) if done.eval else None
    return ([store.ids(i).tolist() for i in range(len(store))],
            [ev.ids(i).tolist() for i in range(len(ev))] if ev else None, done)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    train, _, _ = tokens(tiny_model, write_jsonl(d / "train.jsonl", ROWS), d / "cache")
    val, _, _ = tokens(tiny_model, write_jsonl(d / "val.jsonl", VAL), d / "cache")
    return train, val


def test_json_csv_parquet_arrow_and_globs_tokenize_like_jsonl(tiny_model, tmp_path, reference):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))  # one JSON array
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):  # a data mix in several files, matched by a glob
        datasets.Dataset.from_list(ROWS[i * 10:(i + 1) * 10]).to_parquet(str(parts / f"part-{i}.parquet"))
    for path in ("rows.json", "rows.csv", "rows.parquet", "parts/part-*.parquet"):
        train, _, done = tokens(tiny_model, tmp_path / path, tmp_path / "cache")
        assert train == reference[0], path
        assert done.form == "samsum" and done.eval is None


def test_directories_bring_their_own_validation_split(tiny_model, tmp_path, reference):
    import datasets

    layout = tmp_path / "layout"  # what load_dataset(path) reads: splits named by file
    layout.mkdir()
    write_jsonl(layout / "train.jsonl", ROWS)
    write_jsonl(layout / "validation.jsonl", VAL)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(VAL)}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in (layout, tmp_path / "saved_dict"):
        train, val, done = tokens(tiny_model, path, tmp_path / "cache")
        assert train == reference[0] and val == reference[1], path
        cfg = TrainConfig(model_name=str(tiny_model), data_path=str(path))
        splits = load_splits(cfg, done)
        assert splits.train.examples == len(ROWS) and len(splits.eval) == len(VAL)  # nothing held out of train
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    train, val, _ = tokens(tiny_model, tmp_path / "saved", tmp_path / "cache")
    assert train == reference[0] and val is None


def test_eval_data_path_of_any_format(tiny_model, tmp_path, reference):
    import datasets

    datasets.Dataset.from_list(VAL).to_parquet(str(tmp_path / "val.parquet"))
    _, val, done = tokens(tiny_model, write_jsonl(tmp_path / "t.jsonl", ROWS), tmp_path / "cache",
                          eval_data_path=str(tmp_path / "val.parquet"))
    assert val == reference[1]


def test_bad_paths_are_one_line_naming_the_field(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.csv").write_text("x\n1\n")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nope.jsonl", "no such file or directory"),
                          (tmp_path / "data.xlsx", "unknown file type .xlsx"),
                          (tmp_path / "*.nothing", "no files match"),
                          (tmp_path / "[ab].*", "several or unknown types"),
                          (tmp_path / "empty", "is an empty directory")):
        with pytest.raises(SpecError, match=message) as exc:
            describe(str(path), "train.eval_data_path")
        assert exc.value.field == "train.eval_data_path" and "\n" not in str(exc.value)


def test_unreadable_data_names_the_file(tiny_model, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SpecError, match=r"train.data_path: datasets cannot read .*bad.parquet"):
        preview(describe(str(tmp_path / "bad.parquet")), 10)
    with pytest.raises(SpecError, match=r"train.data_path: datasets cannot read .*bad.parquet"):
        prepare(TrainConfig(model_name=str(tiny_model), data_path=str(tmp_path / "bad.parquet")), tmp_path / "c",
                log=lambda _: None)


def test_preview_reads_the_first_rows_of_every_kind(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for path in (write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "rows.parquet", tmp_path / "saved"):
        rows, columns = preview(describe(str(path)), 4)
        assert rows == ROWS[:4] and set(columns) == {"dialogue", "summary"}


CUSTOM = '''
import json

def get_custom_dataset(dataset_config, tokenizer, split):
    """llama-recipes' signature: prompt/target pairs for train, nothing for validation."""
    if split != "train":
        return None
    rows = [json.loads(line) for line in open(dataset_config.data_path)]
    return [(f"Summarize this dialog:\\n{r['dialogue']}\\n---\\nSummary:\\n", r["summary"]) for r in rows]

def token_ids(dataset_config, tokenizer, split):
    ids = tokenizer("hello there, general kenobi", add_special_tokens=False)["input_ids"]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}] * (8 if split == "train" else 2)

def broken(dataset_config, tokenizer, split):
    raise KeyError(split)
'''


def test_custom_loader_returning_pairs_or_token_ids(tiny_model, tmp_path, reference):
    (tmp_path / "mine.py").write_text(CUSTOM)
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    train, val, done = tokens(tiny_model, data, tmp_path / "cache", dataset="custom",
                              custom_dataset=str(tmp_path / "mine.py"))
    assert train == reference[0] and val is None and done.form == "completion"
    train, val, done = tokens(tiny_model, data, tmp_path / "cache", dataset="custom",
                              custom_dataset=f"{tmp_path / 'mine.py'}:token_ids")
    assert len(train) == 8 and len(val) == 2 and done.form == "tokens"
    with pytest.raises(SpecError, match=r"train.custom_dataset: .*mine.py:broken\(..., split='train'\) raised KeyError"):
        tokens(tiny_model, data, tmp_path / "cache", dataset="custom", custom_dataset=f"{tmp_path / 'mine.py'}:broken")


def test_custom_loader_is_checked_without_running_it(tmp_path):
    from hpcft.dataformat import check_custom_dataset

    (tmp_path / "mine.py").write_text(CUSTOM + "\nraise SystemExit('must not run on the login node')\n")
    check_custom_dataset(f"{tmp_path / 'mine.py'}:token_ids")
    with pytest.raises(SpecError, match="defines no function nope"):
        check_custom_dataset(f"{tmp_path / 'mine.py'}:nope")
    with pytest.raises(SpecError, match="no Python file"):
        check_custom_dataset(str(tmp_path / "missing.py"))
