"""Loading a Bradley–Terry reward model: `AutoModelForSequenceClassification(num_labels=1)` over any backbone.

Encoders (BERT/MiniLM) score through their own [CLS] pooler. Decoders (Qwen3/Llama) score at the last non-pad
token, which HF finds by comparing input ids with `config.pad_token_id`; so a decoder without a pad token gets a
dedicated one (never EOS: a response ending in EOS would then be pooled one token early) and the embedding
matrix grows by one row, as Skywork-Reward V1 did (pad id 128256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from pipelines.rm.attention import resolve_attn_implementation

PAD_TOKEN = "<|reward_pad|>"


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    is_decoder: bool
    name_or_path: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def is_decoder_config(config) -> bool:
    return not getattr(config, "is_encoder_decoder", False) and (
        getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        or config.model_type in {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3", "olmo2"})


def ensure_pad_token(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer and config a real pad token. Returns True when one was added."""
    added = False
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        model.resize_token_embeddings(len(tokenizer))
        added = True
    model.config.pad_token_id = tokenizer.pad_token_id
    return added


@dataclass
class RMTokenizer:
    """The tokenizer side of a reward model (what rendering needs), loaded without its weights: token-store
    builders tokenize millions of pairs where the model is never needed."""

    tokenizer: PreTrainedTokenizerBase
    is_decoder: bool
    name_or_path: str


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> RMTokenizer:
    """The tokenizer exactly as `load_reward_model` sets it up (right padding, the dedicated pad token)."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    decoder = is_decoder_config(config)
    if decoder:
        tok.padding_side = "right"
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return RMTokenizer(tok, decoder, name_or_path)


def load_reward_model(name_or_path: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      attn_implementation: str | None = None, trust_remote_code: bool = False,
                      seed: int = 0) -> RewardModel:
    """Load any local folder or hub id (offline: hub ids resolve from the local cache only).

    `seed` fixes the initialisation of a new score head (and of an added pad embedding): same seed, same model.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    decoder = is_decoder_config(config)
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kwargs = {}
    attn_implementation = resolve_attn_implementation(attn_implementation, device, decoder)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1,
                                                               trust_remote_code=trust_remote_code, **kwargs)
    if decoder:
        tok.padding_side = "right"
        ensure_pad_token(model, tok)
    return RewardModel(model.to(device), tok, decoder, name_or_path)


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_reward_model(rm: RewardModel, path: str, dtype: torch.dtype | None = None) -> None:
    """A plain HF folder: AutoModelForSequenceClassification + tokenizer (with its chat template). The weights keep
    the model's precision (fp32 after training) unless `dtype` (e.g. bfloat16, half the size) says otherwise.

    Under FSDP the full state dict is gathered (collective: every rank calls this) and rank 0 writes it.
    """
    rm.model.config.num_labels = 1
    state_dict = None
    if _is_sharded(rm.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(rm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v)
                      for k, v in (state_dict if state_dict is not None else rm.model.state_dict()).items()}
    rm.model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if dtype is not None:  # the config says what the files hold (save_pretrained wrote the parameters' dtype)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        cfg.dtype = dtype
        cfg.save_pretrained(path)
    rm.tokenizer.save_pretrained(path)
