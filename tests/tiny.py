"""Tiny random models and a small trained tokenizer, built offline in milliseconds, for tests."""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Explain how rainbows form after a storm and why the colors appear in that order.",
    "Write a letter to a friend about a trip to the mountains, the lakes and the small villages.",
    "What are the pros and cons of working from home for a software engineer?",
    "Describe the water cycle, evaporation, condensation and precipitation.",
    "Include the word ocean. Answer in lowercase letters. Use no commas. Wrap the answer in JSON.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, 0123456789 !?.,;:'\"()[]{}<>*#-_",
]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ~400) with a ChatML chat template; pad = eos = <|im_end|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, *, hidden: int = 64, layers: int = 4, vocab: int | None = None, positions: int = 256):
    """A config for a tiny model of ``family`` (llama, gpt2, gemma2, qwen2, mistral, phi3, gpt_neox) with a context
    of ``positions`` tokens."""
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    tokenizer = tiny_tokenizer()
    vocab = vocab or len(tokenizer)
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, pad_token_id=eos)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            max_position_embeddings=positions,
            **common,
        )
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        **common,
    )
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "phi3":
        return Phi3Config(**{**llama_like, "num_key_value_heads": 4})
    if family == "gemma2":
        return Gemma2Config(**llama_like, head_dim=16, sliding_window=128)
    raise ValueError(family)


INIT_RANGE = {"llama": 0.1, "mistral": 0.1, "gpt2": 0.1, "qwen2": 0.3, "gpt_neox": 0.02, "phi3": 0.3, "gemma2": 0.3}


def tiny_hf_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """A deterministic tiny random causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **kwargs)
    # Wider initialisations than the defaults so that greedy decoding varies instead of repeating one token.
    config.initializer_range = INIT_RANGE.get(family, 0.1)
    if family == "gemma2":
        config.tie_word_embeddings, config.final_logit_softcapping = False, None
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def tiny_handle(
    family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs
):
    """A nsteer ModelHandle around a tiny random model."""
    from nsteer.models import wrap_model

    model = tiny_hf_model(family, seed=seed, dtype=dtype, **kwargs).to(device)
    # Full float32 products on a GPU too: parity tests compare against references that run outside nsteer's calls,
    # where torch's default (no TF32) holds; tests/test_models.py checks TF32 inside them.
    return wrap_model(model, tiny_tokenizer(), model_id=f"tiny-{family}-{seed}", tf32=False)
