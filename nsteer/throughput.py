"""How fast this machine generates answers, remembered from earlier runs, so a plan can say how long it will take.

A search or an evaluation records its wall time (generation and scoring; not opening the model) per answer token it
generated (seconds over answers x ``max_new_tokens``) for the model, device, dtype, batch size and torch thread
count it ran with, in
``rates.json`` in the user cache folder (see :func:`nsteer.model_cache.cache_root`). A later plan of the same kind
reads it back; with no record it says so instead of guessing. Each new measurement is averaged with the stored one
(equal weights), so the record follows the machine without jumping on one noisy run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsteer.fileio import atomic_write_bytes, parse_json
from nsteer.model_cache import cache_root
from nsteer.models import resolve_dtype

RATES = "rates.json"
MAX_RECORDS = 256  # kinds of runs remembered; the least recently updated are forgotten first
MAX_FILE = 1024 * 1024


@dataclass(frozen=True)
class RateKey:
    """What a generation rate depends on: the model, where and how it runs, and how many rows share a batch."""

    model: str
    device: str
    dtype: str
    batch_size: int
    threads: int

    @property
    def text(self) -> str:
        """The key as stored."""
        return f"{self.model}|{self.device}|{self.dtype}|batch {self.batch_size}|threads {self.threads}"


def rate_key(model_id: str, device: str, dtype: str, batch_size: int) -> RateKey:
    """The key of generations of ``model_id`` on ``device`` (its type counts: ``cuda:1`` is ``cuda``; ``ndif`` for
    remote runs) in ``dtype`` at ``batch_size`` rows, with this process's torch thread count."""
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto" and (kind == "cpu" or torch.cuda.is_available()):  # what open_model picks on this machine
        dtype = str(resolve_dtype("auto", kind))
    return RateKey(model_id, kind, dtype.removeprefix("torch."), batch_size, torch.get_num_threads())


def handle_rate_key(handle: Any, batch_size: int) -> RateKey:
    """:func:`rate_key` of an opened ModelHandle."""
    if handle.remote:
        return rate_key(handle.model_id, "ndif", "remote", batch_size)
    return rate_key(handle.model_id, str(handle.device), str(handle.dtype), batch_size)


@dataclass(frozen=True)
class Rate:
    """Seconds per answer token, and how many answers the record has seen."""

    seconds_per_token: float
    answers: int

    def seconds(self, answers: int, max_new_tokens: int) -> float:
        """Estimated wall seconds for ``answers`` answers of up to ``max_new_tokens`` tokens."""
        return self.seconds_per_token * answers * max_new_tokens

    def estimate(self, answers: int, max_new_tokens: int) -> str:
        """``≈ 12 min at 0.71 s per answer (this machine, 1,184 earlier answers)``."""
        per_answer = self.seconds_per_token * max_new_tokens
        return (
            f"≈ {duration(self.seconds(answers, max_new_tokens))} at {per_answer:.2g} s per answer "
            f"(measured on this machine over {self.answers:,} earlier answers of this model, device and batch size)"
        )


def read_rate(key: RateKey, root: Path | None = None) -> Rate | None:
    """The recorded rate for ``key``, or None when this machine has none (or the record is unreadable)."""
    entry = _read(root).get(key.text)
    if not isinstance(entry, dict):
        return None
    value, answers = entry.get("seconds_per_token"), entry.get("answers")
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0 or not isinstance(answers, int):
        return None
    return Rate(value, max(answers, 0))


def record_rate(key: RateKey, seconds: float, answers: int, max_new_tokens: int, root: Path | None = None) -> None:
    """Fold a measurement (``answers`` answers in ``seconds``) into the record; failures to write are ignored."""
    if answers <= 0 or max_new_tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
        return
    root = root if root is not None else cache_root()
    if root is None:
        return
    measured = seconds / (answers * max_new_tokens)
    records = dict(_read(root))
    old = read_rate(key, root)
    value = measured if old is None else (old.seconds_per_token + measured) / 2
    records.pop(key.text, None)  # re-inserted last: the most recently updated kinds are kept
    records[key.text] = {"seconds_per_token": value, "answers": answers + (old.answers if old else 0)}
    try:
        atomic_write_bytes(root / RATES, json.dumps(dict(list(records.items())[-MAX_RECORDS:]), indent=1).encode())
    except OSError:
        pass  # a read-only cache: the next plan says it has no rate


def estimate(key: RateKey, answers: int, max_new_tokens: int, root: Path | None = None) -> str:
    """How long ``answers`` answers take at the rate recorded for ``key``, or a plain statement that none is."""
    rate = read_rate(key, root)
    if rate is None:
        return (
            "no rate recorded on this machine for this model, device, dtype and batch size yet, so no estimate: "
            "the progress bar shows the time left once the first answers are in"
        )
    return rate.estimate(answers, max_new_tokens)


class Metered:
    """A generator that counts the answers it generates, so a run can record its rate when it ends."""

    def __init__(self, generator: Callable[..., list[str]]) -> None:
        self.generator = generator
        self.answers = 0

    def __call__(self, handle: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        """Generate, and count what was generated."""
        answers = self.generator(handle, prompts, **kwargs)
        self.answers += len(prompts)
        return answers


def record_run(key: RateKey, meter: Metered, started: float, max_new_tokens: int) -> None:
    """Record the rate of a search or evaluation that started at ``started`` (``time.monotonic()``): its wall time,
    scoring included, over the answers it generated (none generated, e.g. all from a checkpoint: nothing recorded)."""
    if meter.answers:
        record_rate(key, time.monotonic() - started, meter.answers, max_new_tokens)


def _read(root: Path | None) -> Mapping[str, Any]:
    root = root if root is not None else cache_root()
    if root is None:
        return {}
    try:
        with (root / RATES).open("rb") as stream:
            raw = stream.read(MAX_FILE + 1)
        data = parse_json(raw) if len(raw) <= MAX_FILE else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"
