"""Bounds on what a user may ask for, one definition each, shared by recipes, the command line and the SDK; and the
context a model's config states (read by generation and by the perplexity of a reference model)."""

from __future__ import annotations

import math
import numbers
from typing import Any

MAX_NEW_TOKENS = 8192  # tokens generated per answer
MAX_BATCH_SIZE = 4096  # prompts per forward pass or batched generation
MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most an unsigned 64-bit seed; JSON readers a signed one
# A clamp c is in units of ‖u_l‖ (useful values are about -1..2); past this, z_l + c‖u_l‖ could overflow a float.
MAX_CLAMP = 1e6
MAX_LAYERS = 1024  # decoder blocks a vector may describe (released models have a few hundred at most)
MAX_WIDTH = 1 << 16  # residual-stream width a vector may describe (released models: at most ~16k)
# The largest finite value of each model dtype (torch.finfo(dtype).max): a weight past it turns the stream into inf/NaN.
LARGEST_FINITE = {"float32": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38, "float16": 65504.0}
LARGEST_FINITE["auto"] = min(LARGEST_FINITE["float32"], LARGEST_FINITE["bfloat16"])  # auto opens one of these two


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite as a float: NaN, inf and integers past float's range (a JSON or
    Python int of 400 digits; ``math.isfinite`` raises OverflowError on them) are not."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, TypeError, ValueError):
        return False


# Where configs state the positions a model was built for: learned position tables (GPT-2, OPT, GPT-J) fail past it,
# rotary models (Llama, Mistral, Qwen2, Gemma, Phi-3 — whose value already includes its long-context scaling) go
# silently wrong. MPT names it max_seq_len, a few remote-code models seq_length or n_ctx.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")
# Tokenizers without a stated length report a huge sentinel (1e30); anything past this is no statement at all.
LARGEST_PLAUSIBLE_CONTEXT = 1 << 24


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The positions a model handles, from its config (authoritative: it sizes the position machinery); else from the
    tokenizer's ``model_max_length`` when that is a real number; else None (no limit stated, e.g. ALiBi or state-space
    models)."""
    for source in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= LARGEST_PLAUSIBLE_CONTEXT:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= LARGEST_PLAUSIBLE_CONTEXT:
        return value
    return None
