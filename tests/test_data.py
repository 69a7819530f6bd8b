import json

import pytest

from hpcft.errors import SpecError
from hpcft.dataformat import IGNORE_INDEX, detect_format, read_jsonl
from hpcft.train.data import make_collate, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_prompt_is_masked_and_target_ends_with_eos(tokenizer):
    ex = tokenize_example(tokenizer, "Summarize this dialog:\nA: hi\n---\nSummary:\n", "A says hi.", 512)
    n_prompt = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    assert n_prompt > 3
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id and ex["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == "A says hi."


def test_truncation_to_context_length(tokenizer):
    ex = tokenize_example(tokenizer, "word " * 100, "answer", 16)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 16


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"dialogue": "a", "summary": "b"}) + "\n{not json\n")
    with pytest.raises(SpecError, match=r"d.jsonl:2 is not valid JSON") as exc:
        read_jsonl(p)
    assert exc.value.field == "train.data_path"


def test_empty_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n")
    with pytest.raises(SpecError, match="no examples"):
        read_jsonl(p)


def test_format_detection_and_missing_columns():
    assert detect_format([{"dialogue": "a", "summary": "b"}], "auto", "f") == "samsum"
    assert detect_format([{"instruction": "a", "input": "", "output": "b"}], "auto", "f") == "alpaca"
    with pytest.raises(SpecError, match="cannot tell"):
        detect_format([{"text": "a"}], "auto", "f")
    with pytest.raises(SpecError, match="example 2 lacks text column"):
        detect_format([{"dialogue": "a", "summary": "b"}, {"dialogue": "a"}], "samsum", "f")


def test_collate_pads_ids_and_masks_labels():
    batch = make_collate(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_submit_time_token_counts_match_the_training_tokenizer(tiny_model, tokenizer):
    """hpcft submit counts prompt tokens with `tokenizers` alone (no transformers import): the counts
    must be the ones training will see, or the context_length check would lie."""
    from hpcft.dataformat import FastCounter, token_counter

    counter = token_counter(str(tiny_model))
    assert isinstance(counter, FastCounter)
    for text in ["Summarize this dialog:\nAnna: Hi!\n---\nSummary:\n", "  spaces  and ünïcödé — 123 ", ""]:
        assert counter.encode(text) == tokenizer.encode(text, add_special_tokens=False)


def test_submit_time_data_check_does_not_import_torch(tiny_model, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"dialogue": "A: hi", "summary": "A says hi."}) + "\n")
    code = ("import sys; from hpcft.spec import spec_from_dict; from hpcft.submit import check_data; "
            f"check_data(spec_from_dict({{'train': {{'model_name': {str(tiny_model)!r}, 'data_path': {str(data)!r}}}}})); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_non_utf8_data_is_a_spec_error_with_line_and_offset(tmp_path):
    """What the ranks read with (read_jsonl) and the login node's whole-file check name the same byte."""
    from hpcft.dataformat import check_utf8

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"dialogue": "a", "summary": "b"}\n' * 2 + b'{"dialogue": "caf\xe9", "summary": "b"}\n')
    for check in (lambda: read_jsonl(p), lambda: check_utf8(p, "train.data_path", block=7)):
        with pytest.raises(SpecError, match=r"d.jsonl:3 is not UTF-8 \(byte 0xe9 at offset 85\)"):
            check()
