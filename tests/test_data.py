"""Data forms: what each form tokenizes to and learns from, detection, the login-node checks."""
import json
import shutil

import numpy as np
import pytest

from hpcft.dataformat import IGNORE_INDEX, detect_form, read_jsonl
from hpcft.errors import SpecError
from hpcft.encode import encode_batch
from hpcft.train.config import TrainConfig
from hpcft.train.packing import pad_collate


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def encode(tokenizer, rows, form, ctx=512, seq2seq=False, field="text"):
    batch = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    out = encode_batch(batch, list(range(len(rows))), form=form, tok=tokenizer, ctx=ctx, seq2seq=seq2seq,
                       text_field=field, source="test", field="train.data_path")
    return [(np.array(i), np.array(lab)) for i, lab in zip(out["input_ids"], out["labels"])]


def learned(tokenizer, ids, labels):
    return tokenizer.decode(ids[labels != IGNORE_INDEX])


def test_prompt_is_masked_and_target_ends_with_eos(tokenizer):
    [(ids, labels)] = encode(tokenizer, [{"dialogue": "A: hi", "summary": "A says hi."}], "samsum")
    n_prompt = int((labels == IGNORE_INDEX).sum())
    assert n_prompt > 3 and (labels[:n_prompt] == IGNORE_INDEX).all()
    assert (labels[n_prompt:] == ids[n_prompt:]).all()
    assert ids[-1] == tokenizer.eos_token_id and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "A says hi."
    assert tokenizer.decode(ids[1:n_prompt]) == "Summarize this dialog:\nA: hi\n---\nSummary:\n"


@pytest.mark.parametrize("form,row,prompt,target", [
    ("alpaca", {"instruction": "Add.", "input": "2 and 3", "output": "5"}, "### Input:\n2 and 3\n\n### Response:\n", "5"),
    ("alpaca", {"instruction": "Greet.", "input": "", "output": "Hi"}, "### Instruction:\nGreet.\n\n### Response:\n", "Hi"),
    ("grammar", {"input": "she go home", "target": "She goes home."},
     "Correct this to standard English: she go home\n---\nCorrected: ", "She goes home."),
    ("completion", {"prompt": "2+2=", "completion": "4"}, "2+2=", "4"),
    ("completion", {"prompt": "Q: sky?", "target": " blue"}, "Q: sky?", " blue"),
])
def test_prompt_target_forms(tokenizer, form, row, prompt, target):
    [(ids, labels)] = encode(tokenizer, [row], form)
    assert tokenizer.decode(ids[labels == IGNORE_INDEX]).endswith(prompt)
    assert learned(tokenizer, ids, labels) == target + tokenizer.eos_token


def test_truncation_to_context_length_and_examples_with_nothing_left_to_learn_are_dropped(tokenizer):
    rows = [{"prompt": "word " * 100, "completion": "answer"}, {"prompt": "short", "completion": "answer " * 50}]
    [(ids, labels)] = encode(tokenizer, rows, "completion", ctx=16)
    assert len(ids) == len(labels) == 16 and learned(tokenizer, ids, labels).startswith("answer")


def test_chat_learns_only_assistant_turns_with_their_end_of_turn(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome."}]
    [(ids, labels)] = encode(tokenizer, [{"messages": msgs}], "chat")
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert learned(tokenizer, ids, labels) == "4.<|im_end|>\nWelcome.<|im_end|>\n"
    # ShareGPT's conversations/from/value is the same conversation
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in msgs]
    [(ids2, labels2)] = encode(tokenizer, [{"conversations": share}], "chat")
    assert (ids2 == ids).all() and (labels2 == labels).all()


def test_chat_without_assistant_turn_or_with_bad_turns_names_the_example(tokenizer):
    with pytest.raises(SpecError, match=r"train.data_path: example 2 of test: .*no assistant turn"):
        encode(tokenizer, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                           {"messages": [{"role": "user", "content": "hi"}]}], "chat")
    with pytest.raises(SpecError, match=r"example 1 of test: turn 1 needs a text role and text content"):
        encode(tokenizer, [{"messages": [{"role": "user", "content": ["image", "text"]}]}], "chat")


def test_text_form_learns_every_token_and_cuts_long_texts_into_pieces(tokenizer):
    text = " ".join(f"word{i}" for i in range(200))
    pieces = encode(tokenizer, [{"body": text}], "text", ctx=64, field="body")
    assert len(pieces) > 2 and all(len(i) <= 64 for i, _ in pieces)
    assert all((i == lab).all() for i, lab in pieces)
    joined = np.concatenate([i for i, _ in pieces])
    assert joined[0] == tokenizer.bos_token_id and joined[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(joined[1:-1]) == text  # nothing dropped


def test_tokens_form_passes_ids_through(tokenizer):
    [(ids, labels), (ids2, labels2)] = encode(
        tokenizer, [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}], "tokens", ctx=3)
    assert ids.tolist() == [5, 6, 7] and labels.tolist() == [5, 6, 7]
    assert labels2.tolist() == [-100, 10, 11]
    with pytest.raises(SpecError, match="token id 99999 is outside the tokenizer's vocabulary"):
        encode(tokenizer, [{"input_ids": [5, 99999]}], "tokens")


def test_form_detection_from_columns():
    cases = {"chat": ["messages"], "tokens": ["input_ids", "attention_mask"], "samsum": ["id", "dialogue", "summary"],
             "alpaca": ["instruction", "input", "output"], "grammar": ["input", "target"],
             "completion": ["prompt", "completion"], "text": ["text", "meta"]}
    for form, cols in cases.items():
        assert detect_form(cols, "auto", "f") == form
    assert detect_form(["conversations", "text"], "auto", "f") == "chat"  # the order decides
    assert detect_form(["content"], "auto", "f", text_field="content") == "text"
    with pytest.raises(SpecError, match=r"cannot tell the data form from columns \['question'\]"):
        detect_form(["question"], "auto", "f")
    with pytest.raises(SpecError, match="dataset=samsum needs column.s. summary; the data has dialogue"):
        detect_form(["dialogue"], "samsum", "f")


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


def test_collate_pads_ids_and_masks_labels():
    batch = pad_collate(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert int(batch["num_tokens"]) == 4


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


def test_chat_data_needs_a_chat_template_named_by_its_field(tiny_model, tmp_path):
    """A tokenizer without a chat template: the login-node check and the tokenizing step both name
    train.chat_template; setting it (inline or as a file) fixes both."""
    from hpcft.dataformat import check_chat_template
    from hpcft.prepare import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = TrainConfig(model_name=str(bare), dataset="chat")
    with pytest.raises(SpecError, match=r"^train.chat_template: the tokenizer in .* has no chat template"):
        check_chat_template(cfg)
    template = (tiny_model / "chat_template.jinja").read_text()
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        cfg = TrainConfig(model_name=str(bare), dataset="chat", chat_template=value)
        check_chat_template(cfg)
        assert load_tokenizer(cfg).chat_template == template


def test_chat_templates_that_refuse_or_rewrite_turns(tokenizer):
    """A template's own raise_exception names the example; one that renders earlier turns differently
    once later ones follow cannot have its assistant turns found; one that refuses a prefix (here: a
    generation prompt after a system turn) still masks right, from where the turn's content starts."""
    from hpcft.encode import assistant_spans

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    strict = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
              "{{ raise_exception('system only first') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = strict
    with pytest.raises(SpecError, match=r"train.chat_template: example 3: the chat template refused .*system only first"):
        assistant_spans(tok, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                              {"role": "assistant", "content": "c"}], "example 3")
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['role'] }}]{{ m['content'] }}"
                         "{% else %}<{{ m['content'] }}>{% endif %}{% endfor %}")  # drops earlier roles
    with pytest.raises(SpecError, match="renders earlier turns differently"):
        assistant_spans(tok, msgs, "example 1")
    tok.chat_template = ("{% if add_generation_prompt and messages[-1]['role'] == 'system' %}"
                         "{{ raise_exception('no') }}{% endif %}{% for m in messages %}[{{ m['role'] }}]"
                         "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    text, spans = assistant_spans(tok, msgs[:3], "example 1")
    assert [text[a:b] for a, b in spans] == ["A"]
