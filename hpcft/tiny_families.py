"""Tiny random configs, one per model family people fine-tune, from transformers' own config classes: the
layouts that matter to loading, sharding, LoRA and export (tied embeddings, fused projections, Conv1D,
sliding windows, mixtures of experts, encoder-decoders) at a size a CPU trains in seconds.

    config = family_config("gemma2", ids, vocab=4096, hidden=64, layers=2, heads=4)

`hpcft make-tiny-model DIR --arch FAMILY` saves one with the project's tokenizer. FAMILIES says which
layout each one stands for; SEQ2SEQ names the encoder-decoders.
"""
from __future__ import annotations

FAMILIES: dict[str, str] = {
    "llama": "Llama 3 (untied embeddings)",
    "llama-tied": "Llama 3.2 1B/3B layout (tie_word_embeddings: true)",
    "qwen2": "Qwen2 / Qwen2.5 0.5B-3B (tied, q/k/v bias)",
    "qwen3": "Qwen3 (tied, q/k norm, head_dim of its own)",
    "mistral": "Mistral (sliding-window attention)",
    "gemma": "Gemma 1 (tied, scaled embeddings, head_dim of its own)",
    "gemma2": "Gemma 2 (tied, logit soft-capping, local/global layers)",
    "gemma3": "Gemma 3 text (tied, q/k norm, local/global layers)",
    "phi3": "Phi-3 (fused qkv_proj and gate_up_proj)",
    "gpt2": "GPT-2 (tied, Conv1D c_attn/c_proj)",
    "gpt-neox": "GPT-NeoX / Pythia (fused query_key_value)",
    "olmo2": "OLMo 2 (q/k norm after the projections)",
    "mixtral": "Mixtral (mixture of experts, router auxiliary loss)",
    "t5": "T5 (encoder-decoder, relative attention, tied)",
    "bart": "BART (encoder-decoder, tied)",
}
SEQ2SEQ = {"t5", "bart"}
MOE = {"mixtral"}


def family_config(family: str, ids: dict, *, vocab: int, hidden: int, layers: int, heads: int):
    """A transformers config for `family`; ids: bos/eos/pad token ids of the tokenizer it is saved with."""
    import transformers as tf

    ffn = max(8, hidden * 8 // 3 // 8 * 8)
    kv = max(1, heads // 2)
    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=2048, **ids)
    decoders = {
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=heads, tie_word_embeddings=False),
        "llama-tied": lambda: tf.LlamaConfig(**common, num_key_value_heads=kv, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=kv, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**common, num_key_value_heads=kv, head_dim=head_dim * 2,
                                        tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=kv, sliding_window=16,
                                            tie_word_embeddings=False),
        "gemma": lambda: tf.GemmaConfig(**common, num_key_value_heads=kv, head_dim=head_dim),
        "gemma2": lambda: tf.Gemma2Config(**common, num_key_value_heads=kv, head_dim=head_dim, sliding_window=16,
                                          query_pre_attn_scalar=head_dim),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, num_key_value_heads=kv, head_dim=head_dim, sliding_window=16,
                                              query_pre_attn_scalar=head_dim),
        "phi3": lambda: tf.Phi3Config(**common, num_key_value_heads=heads, tie_word_embeddings=False),
        "olmo2": lambda: tf.Olmo2Config(**common, num_key_value_heads=heads, tie_word_embeddings=False),
        "mixtral": lambda: tf.MixtralConfig(**common, num_key_value_heads=kv, num_local_experts=4,
                                            num_experts_per_tok=2, output_router_logits=True,
                                            router_aux_loss_coef=0.02, tie_word_embeddings=False),
    }
    if family in decoders:
        return decoders[family]()
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "gpt-neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=hidden * 4, max_position_embeddings=2048,
                                rotary_pct=0.25, tie_word_embeddings=False, **ids)
    if family == "t5":
        return tf.T5Config(vocab_size=vocab, d_model=hidden, d_kv=head_dim, d_ff=hidden * 2, num_layers=max(1, layers // 2),
                           num_heads=heads, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=True,
                           decoder_start_token_id=ids["pad_token_id"], **ids)
    if family == "bart":
        half = max(1, layers // 2)
        return tf.BartConfig(vocab_size=vocab, d_model=hidden, encoder_layers=half, decoder_layers=half,
                             encoder_attention_heads=heads, decoder_attention_heads=heads,
                             encoder_ffn_dim=hidden * 2, decoder_ffn_dim=hidden * 2,
                             max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                             decoder_start_token_id=ids["eos_token_id"], forced_bos_token_id=None, **ids)
    raise ValueError(f"no tiny config for family {family!r}; families: {', '.join(FAMILIES)}")
