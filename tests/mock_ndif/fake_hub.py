"""An offline fake of the Hugging Face Hub cache, so Hub ids resolve with no network.

``write_fake_hub(dir)`` saves every tiny model of ``tiny_models.TINY_MODELS`` in the
standard cache layout (``models--org--name/{refs/main, snapshots/<commit>/...}``):
config, weights (safetensors) and tokenizer. Pointed at it with
``HF_HUB_CACHE=dir HF_HUB_OFFLINE=1``, transformers loads ``"mock-ndif/tiny-llama"``
like any Hub id: the client builds its meta model from it and the mock server's
worker loads the real weights from it, so both sides agree on the architecture and
a local model built from the same cache gives exact parity.

``use_fake_hub(dir)`` points an already-running process at it (patching
``huggingface_hub.constants``, which both huggingface_hub and transformers read at
call time) and pre-answers nnsight's one Hub call, the id canonicalization in
``HuggingFaceModel._remoteable_model_key`` (``HfApi().model_info(id).id``), by
seeding ``nnsight.modeling.huggingface._ID_CACHE``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

#: The commit every fake snapshot is stored under (refs/main points at it).
FAKE_COMMIT = "0" * 40


def snapshot_dir(cache: str | os.PathLike, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / FAKE_COMMIT


def write_fake_hub(cache: str | os.PathLike, repo_ids: Iterable[str] | None = None) -> Path:
    """Write (idempotently) a snapshot per tiny model into ``cache``; return ``cache``."""
    try:
        from . import tiny_models
    except ImportError:  # imported as a top-level module
        import tiny_models  # type: ignore[no-redef]

    cache = Path(cache)
    for repo_id in repo_ids or tiny_models.TINY_MODELS:
        snapshot = snapshot_dir(cache, repo_id)
        if (snapshot / "model.safetensors").exists():
            continue
        snapshot.mkdir(parents=True, exist_ok=True)
        refs = snapshot.parents[1] / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(FAKE_COMMIT)
        model = tiny_models.build_hf_model(repo_id)
        model.save_pretrained(snapshot)
        tiny_models.make_tokenizer().save_pretrained(snapshot)
    return cache


def publish_model(cache: str | os.PathLike, repo_id: str, model: Any, tokenizer: Any) -> Path:
    """Put any transformers model + tokenizer into the fake Hub under ``repo_id``.

    For suites with their own tiny models (e.g. a chat-template tokenizer). The
    snapshot is written once: a second publish of the same id raises, because a
    server that already loaded the first would keep serving it.
    """
    snapshot = snapshot_dir(cache, repo_id)
    if snapshot.exists():
        raise ValueError(f"{repo_id!r} is already in the fake Hub at {cache}; use a new id")
    snapshot.mkdir(parents=True)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(FAKE_COMMIT)
    model.config.name_or_path = repo_id
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    return snapshot


@contextlib.contextmanager
def use_fake_hub(cache: str | os.PathLike, repo_ids: Iterable[str] = ()) -> Iterator[None]:
    """Resolve Hub ids from ``cache``, offline, inside this process, for the block."""
    import huggingface_hub.constants as constants
    import nnsight.modeling.huggingface as nnsight_hf

    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, dict(nnsight_hf._ID_CACHE))
    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    constants.HF_HUB_CACHE = str(cache)
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    for repo_id in repo_ids:
        nnsight_hf._ID_CACHE[repo_id] = repo_id
    try:
        yield
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, ids = saved
        nnsight_hf._ID_CACHE.clear()
        nnsight_hf._ID_CACHE.update(ids)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
