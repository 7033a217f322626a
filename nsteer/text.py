"""Text that came from a user, a file or a model, made safe to show: control characters visible, markup inert.

A prompt, an answer, a path, an instruction name or a vector file's metadata is data. Printed raw, an ANSI or OSC
escape sequence inside it would recolour the terminal, retitle the window or plant a link; a carriage return would
overwrite what came before; a bidirectional override would reorder what the reader sees. :func:`visible` escapes all
of them as Python's ``repr`` would (``\\x1b``, ``\\r``, ``\\u202e``) and leaves everything else, markup brackets
included, exactly as it was. :func:`markdown_text` does the same for a cell of a Markdown report.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls (0x9b is a one-byte CSI on some terminals), lone surrogates
# (an undecodable byte of a file name or argument; printing one raises UnicodeEncodeError), line/paragraph separators,
# and the bidirectional embeddings, overrides and isolates.
_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069"
_MULTILINE = re.compile(f"[{_CONTROL}]")
_ONE_LINE = re.compile(f"[{_CONTROL}\t\n]")


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def visible(text: object, *, newlines: bool = False) -> str:
    """``str(text)`` with every control character escaped as in ``repr``; line breaks and tabs kept if ``newlines``."""
    return (_MULTILINE if newlines else _ONE_LINE).sub(_escape, str(text))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown for one table cell or line: visible, specials backslash-escaped, no HTML."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", visible(text))
    return escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
