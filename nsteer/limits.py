"""Bounds on what a user may ask for, one definition each, shared by recipes, the command line and the SDK."""

from __future__ import annotations

MAX_NEW_TOKENS = 8192  # tokens generated per answer
MAX_BATCH_SIZE = 4096  # prompts per forward pass or batched generation
MAX_LAYERS = 1024  # decoder blocks a vector may describe (released models have a few hundred at most)
MAX_WIDTH = 1 << 16  # residual-stream width a vector may describe (released models: at most ~16k)
# The largest finite value of each model dtype (torch.finfo(dtype).max): a weight past it turns the stream into inf/NaN.
LARGEST_FINITE = {"float32": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38, "float16": 65504.0}
