"""Build a small Llama-architecture model and a BPE tokenizer locally (no model hub):

    hpcft make-tiny-model artifacts/tiny-llama                 # 1.8M params, vocab 4096
    hpcft make-tiny-model artifacts/llama-16m --hidden-size 512
    hpcft make-tiny-model artifacts/tiny-bart --arch bart       # encoder-decoder, for summarization
    hpcft make-tiny-model artifacts/tiny-gemma2 --arch gemma2   # any family of hpcft.tiny_families

The tokenizer is trained with `tokenizers` on the shipped JSONL data and carries a ChatML chat
template (<|im_start|>role ... <|im_end|>), so chat data trains end to end; both are saved with
save_pretrained and load back through AutoModelForCausalLM / AutoTokenizer like any hub model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from hpcft.dataformat import TEMPLATES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
# ChatML, as many instruction-tuned models write it; bos first, each turn closed by <|im_end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_lines(files: Iterable[str | Path]) -> Iterator[str]:
    yield from TEMPLATES
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                for v in row.values():
                    if isinstance(v, str):
                        yield v
                    elif isinstance(v, list):  # chat turns
                        yield from (t.get("content", "") for t in v if isinstance(t, dict))


def train_tokenizer(files: Iterable[str | Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(files), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=2048, chat_template=CHAT_TEMPLATE)


def tiny_config(arch: str, tokenizer, *, hidden_size: int, num_layers: int, num_heads: int):
    """The config of a tiny `arch` (a family of hpcft.tiny_families) for this tokenizer."""
    from hpcft.tiny_families import family_config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return family_config(arch, ids, vocab=len(tokenizer), hidden=hidden_size, layers=num_layers, heads=num_heads)


def make_tiny_model(out_dir: str | Path, *, corpus: Iterable[str | Path], vocab_size: int = 4096,
                    hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, seed: int = 0,
                    arch: str = "llama", tokenizer=None) -> Path:
    """A random `arch` model and its tokenizer (trained on corpus, or the one given) saved in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from hpcft.tiny_families import SEQ2SEQ

    out = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(list(corpus), vocab_size)
    config = tiny_config(arch, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    torch.manual_seed(seed)
    cls = AutoModelForSeq2SeqLM if arch in SEQ2SEQ else AutoModelForCausalLM
    model = cls.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def make_tiny_zoo(root: str | Path, families: Iterable[str], *, corpus: Iterable[str | Path], vocab_size: int = 1024,
                  **sizes) -> dict[str, Path]:
    """One tiny model per family under root/<family>, sharing one tokenizer (trained once)."""
    tokenizer = train_tokenizer(list(corpus), vocab_size)
    return {f: make_tiny_model(Path(root) / f, corpus=(), arch=f, tokenizer=tokenizer, **sizes) for f in families}


def count_parameters(model_dir: str | Path) -> int:
    """Parameters stored in a saved model, read from the safetensors headers (no model built)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total
