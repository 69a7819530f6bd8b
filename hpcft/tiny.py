"""Build a small Llama-architecture model and a BPE tokenizer locally (no model hub):

    hpcft make-tiny-model artifacts/tiny-llama                 # 1.8M params, vocab 4096
    hpcft make-tiny-model artifacts/llama-16m --hidden-size 512
    hpcft make-tiny-model artifacts/tiny-bart --arch bart       # encoder-decoder, for summarization

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


ARCHS = ("llama", "bart")


def tiny_config(arch: str, tokenizer, *, hidden_size: int, num_layers: int, num_heads: int):
    from transformers import BartConfig, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "bart":
        half = max(1, num_layers // 2)
        return BartConfig(vocab_size=len(tokenizer), d_model=hidden_size, encoder_layers=half, decoder_layers=half,
                          encoder_attention_heads=num_heads, decoder_attention_heads=num_heads,
                          encoder_ffn_dim=hidden_size * 2, decoder_ffn_dim=hidden_size * 2,
                          max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=None, **ids)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=hidden_size * 8 // 3 // 8 * 8 or 8, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=2048,
                       tie_word_embeddings=False, **ids)


def make_tiny_model(out_dir: str | Path, *, corpus: Iterable[str | Path], vocab_size: int = 4096,
                    hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, seed: int = 0,
                    arch: str = "llama") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(list(corpus), vocab_size)
    config = tiny_config(arch, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    torch.manual_seed(seed)
    cls = AutoModelForSeq2SeqLM if arch == "bart" else AutoModelForCausalLM
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
