"""Tiny random-init decoder reward models (Qwen3 / Llama shapes) built locally, for tests and CPU demos.

No download: a byte-level BPE tokenizer is trained on a few sentences and given a ChatML template with a BOS
token, so the BOS-strip, pad-token and last-token pooling paths are all exercised.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. What is 2 + 2? It is 4.",
    "I can't help with that because it could hurt someone.",
    "Here are a few ideas: keep a regular bedtime; avoid screens.",
    "def square(x):\n    return x * x",
    "Sure! First get the right tools, then do it when nobody is watching.",
] * 20


def build_tokenizer(path: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_decoder(path: str | Path, arch: str = "qwen3", seed: int = 0, hidden: int = 128, layers: int = 2) -> str:
    """Write a random-init `arch` (qwen3 | llama) causal LM + tokenizer to `path`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                  max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    cfg = Qwen3Config(**common) if arch == "qwen3" else LlamaConfig(**common)
    cfg.architectures = ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"]
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)
