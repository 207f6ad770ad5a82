"""A tiny random-init checkpoint (the bundled tokenizer + a 2-layer Llama): what the tests serve, and
what `feedloop bench gateway` puts behind the gateway so the gateway, not the model, is measured.
Lives here (an installed package) so bench and tests share one definition."""
from __future__ import annotations

from pathlib import Path


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, tokenizer=None) -> Path:
    """Write a tiny Llama with the bundled tokenizer (or `tokenizer`) to `out_dir` (HF format, safetensors).

    initializer_range is large on purpose: a random model with the usual 0.02 has nearly flat
    logits, where greedy argmax would hinge on the last bits of float rounding; with 0.5 the
    top logit stands clear, so parity tests test the engine and not the rounding.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from serving.models import load_bundled_tokenizer

    tok = tokenizer if tokenizer is not None else load_bundled_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
