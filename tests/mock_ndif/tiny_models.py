"""Tiny random models, built deterministically from configs, for the mock NDIF server.

The same functions run in two places, on one machine, and must build the same weights bit for bit (what the
models compute from them may still differ in the last bits where the two processes use different thread counts):

* the **worker** process behind the mock server (which hosts the model under a
  Hub-style id), and
* the **test process** (which builds the identical model locally for parity, and a
  weightless meta copy that names the Hub id in its remote requests).

Nothing here touches the network: the tokenizer is a byte-level BPE with no merges
(one token per UTF-8 byte plus two specials) built from code, and the weights come
from per-parameter seeded generators, so they do not depend on module
construction order or on the global RNG.

This module must import nothing from the repository (the worker imports it with
the repository off ``sys.path``): torch, transformers and tokenizers only.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from typing import Any

import torch

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 260  # 256 bytes + 2 specials, rounded up


def _llama_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _gpt2_config(layers: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        dtype="float32",
    )


#: Hub-style id -> (config factory, weight seed). The ids deliberately look like
#: real Hub ids; nothing resolves them against the Hub.
TINY_MODELS: dict[str, tuple[Callable[[], Any], int]] = {
    "mock-ndif/tiny-llama": (lambda: _llama_config(3), 0),
    "mock-ndif/tiny-llama-2l": (lambda: _llama_config(2), 1),
    "mock-ndif/tiny-gpt2": (lambda: _gpt2_config(2), 2),
    # In the fake Hub (so a client can build it) but never deployed on the server.
    "mock-ndif/tiny-llama-offline": (lambda: _llama_config(2), 3),
}

DEFAULT_MODEL = "mock-ndif/tiny-llama"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|bos|>{{ message['role'] }}\n{{ message['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
#: Ids the mock server runs by default (all but the offline one).
DEPLOYED = tuple(repo_id for repo_id in TINY_MODELS if not repo_id.endswith("-offline"))
UNDEPLOYED_MODEL = "mock-ndif/tiny-llama-offline"


def make_config(repo_id: str) -> Any:
    """A fresh config for a registered id (``KeyError`` for an unknown one)."""
    factory, _ = TINY_MODELS[repo_id]
    config = factory()
    config.name_or_path = repo_id
    return config


def make_tokenizer() -> Any:
    """A byte-level tokenizer: one id per UTF-8 byte (0-255), BOS 256, EOS 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable-unicode table, in byte order, so id == byte value.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    vocab = {chars[byte]: byte for byte in range(256)}
    vocab[BOS_TOKEN] = BOS_ID
    vocab[EOS_TOKEN] = EOS_ID

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from its own seeded generator (order-independent)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if param.ndim == 1 and (
                "norm" in name
                or name.endswith("ln_1.weight")
                or name.endswith("ln_2.weight")
                or name.endswith("ln_f.weight")
            ):
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            elif param.ndim == 1:
                values = 0.02 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))


def build_hf_model(repo_id: str) -> torch.nn.Module:
    """The real (CPU, float32, eval-mode) transformers model registered under ``repo_id``."""
    from transformers import AutoModelForCausalLM

    _, seed = TINY_MODELS[repo_id]
    model = AutoModelForCausalLM.from_config(make_config(repo_id))
    _init_weights(model, seed)
    model.eval()
    return model


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of the weights, to check client and server hold the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]
