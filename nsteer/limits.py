"""Bounds on what a user may ask for, one definition each, shared by recipes, the command line and the SDK."""

from __future__ import annotations

MAX_NEW_TOKENS = 8192  # tokens generated per answer
MAX_BATCH_SIZE = 4096  # prompts per forward pass or batched generation
