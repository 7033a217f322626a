"""A cache of de-quantized GGUF models, so a second command opens the embedded model in about a second, not ~25.

An entry is a Hugging Face model folder holding only data: ``config.json``, ``generation_config.json``, the fp32
weights as ``model.safetensors`` (never pickle) and the tokenizer's JSON files, plus ``manifest.json``, which names
the GGUF it came from (size and sha256), the versions of the code that converted it, and the size and sha256 of every
file of the folder (the weights per 64 MiB block, so they verify on every core at once).

An entry is used only when its manifest names the same GGUF content and converter versions, the folder holds exactly
the files it lists, and every file matches its hash; anything else is a miss, and the entry is rewritten. Entries are
written into a temporary folder beside the final one and renamed into place, so a reader never sees half of one.
The GGUF's own sha256 is computed once per file and remembered by path, size and modification time.

Where: ``$NSTEER_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsteer``, else ``~/.cache/nsteer``; ``NSTEER_NO_CACHE=1`` turns
the cache off. An entry takes four bytes per parameter (540 MB for the embedded model).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so killed writes' staging folders are left for the user to delete
    fcntl = None  # type: ignore[assignment]

from nsteer.fileio import atomic_write_bytes, parse_json, user_cache_dir

FORMAT = 1
BLOCK = 64 * 1024 * 1024  # bytes per hashed block of a cached file
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
DIGESTS = "gguf-digests.json"  # GGUF sha256 by path, size and mtime
MAX_DIGESTS = 64  # remembered GGUF files; the oldest are forgotten first
MAX_SMALL_FILE = 64 * 1024 * 1024  # bytes read from a manifest or the digest memo at most
CONVERTERS = ("transformers", "gguf", "tokenizers")  # packages whose version changes what an entry holds
STAGING_SUFFIX = ".nsteer-staging"
STALE_SECONDS = 60  # a staging folder this old whose lock is free belongs to a killed write


def cache_root() -> Path | None:
    """The cache folder (``$NSTEER_CACHE_DIR``, ``$XDG_CACHE_HOME/nsteer`` or ``~/.cache/nsteer``); None when off."""
    if os.environ.get("NSTEER_NO_CACHE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    return user_cache_dir()


@dataclass(frozen=True)
class GGUFIdentity:
    """What a cache entry is keyed by: the GGUF file's content (size and sha256)."""

    size: int
    sha256: str


def sha256_blocks(path: Path) -> list[str]:
    """The sha256 of every ``BLOCK`` bytes of ``path``, hashed on all cores (hashlib releases the GIL)."""
    size = path.stat().st_size
    offsets = range(0, max(size, 1), BLOCK)

    def block_digest(offset: int) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            stream.seek(offset)
            digest.update(stream.read(BLOCK))
        return digest.hexdigest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1)) as pool:
        return list(pool.map(block_digest, offsets))


def file_sha256(path: Path) -> str:
    """The sha256 of a whole file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def gguf_identity(path: Path, root: Path) -> GGUFIdentity:
    """The GGUF's size and sha256; remembered in ``root`` by resolved path, size and mtime, so it is hashed once."""
    path = path.resolve()
    stat = path.stat()
    memo = _read_json(root / DIGESTS)
    known = memo.get(str(path))
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
        and _is_sha256(known.get("sha256"))
    ):
        return GGUFIdentity(stat.st_size, known["sha256"])
    identity = GGUFIdentity(stat.st_size, file_sha256(path))
    fresh = {key: value for key, value in memo.items() if key != str(path)}
    fresh[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": identity.sha256}
    try:
        _write_json(root / DIGESTS, dict(list(fresh.items())[-MAX_DIGESTS:]))
    except OSError:
        pass  # a read-only cache: hash again next time
    return identity


def converter_versions() -> dict[str, str]:
    """Versions of the packages that turn a GGUF into weights and a tokenizer (a new version means a new entry)."""
    versions = {}
    for package in CONVERTERS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def entry_folder(root: Path, identity: GGUFIdentity) -> Path:
    """The folder of the entry for one GGUF content."""
    return root / "gguf" / f"{identity.sha256[:32]}-{identity.size}"


@dataclass(frozen=True)
class Entry:
    """A cache folder whose manifest names the GGUF asked for and this version of the converters."""

    folder: Path
    identity: GGUFIdentity


def entry_candidate(gguf_path: Path, root: Path | None = None) -> Entry | None:
    """The entry for ``gguf_path`` if its manifest, file names and sizes fit (cheap checks; no file hashed yet).

    Use its files only once :func:`verify_entry` has checked their hashes (a loader may read them meanwhile).
    """
    root = root if root is not None else cache_root()
    if root is None:
        return None
    try:
        identity = gguf_identity(gguf_path, root)
    except OSError:
        return None
    folder = entry_folder(root, identity)
    return Entry(folder, identity) if verify_entry(folder, identity, hashes=False) else None


def find_entry(gguf_path: Path, root: Path | None = None) -> Path | None:
    """The verified cache folder of ``gguf_path``'s de-quantized model, or None (cache off, missing or damaged)."""
    candidate = entry_candidate(gguf_path, root)
    return candidate.folder if candidate is not None and verify_entry(candidate.folder, candidate.identity) else None


def verify_entry(folder: Path, identity: GGUFIdentity, *, hashes: bool = True) -> bool:
    """Whether ``folder`` is a complete, unaltered entry made from ``identity`` by this version of the converters
    (``hashes=False``: every check but the files' hashes)."""
    manifest = _read_json(folder / MANIFEST)
    files = manifest.get("files")
    if (
        manifest.get("format") != FORMAT
        or manifest.get("gguf") != {"size": identity.size, "sha256": identity.sha256}
        or manifest.get("converters") != converter_versions()
        or not isinstance(files, dict)
        or WEIGHTS not in files
    ):
        return False
    try:
        present = {path.name for path in folder.iterdir()}
        if present != set(files) | {MANIFEST}:
            return False  # a missing file, or one nsteer did not write (it would be read by from_pretrained)
        for name, expected in files.items():
            path = folder / name
            if not isinstance(expected, dict) or not path.is_file() or path.stat().st_size != expected.get("size"):
                return False
            if hashes and sha256_blocks(path) != expected.get("sha256_blocks"):
                return False
    except OSError:
        return False
    return True


def can_store(gguf_path: Path, root: Path | None = None) -> bool:
    """Whether an entry for ``gguf_path`` could be written: the cache is on, writable, with room for fp32 weights."""
    root = root if root is not None else cache_root()
    if root is None:
        return False
    try:
        (root / "gguf").mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    # Quantized weights take 0.5-2 bytes per parameter: 8x the file bounds the fp32 copy with room to spare.
    return free > 8 * gguf_path.stat().st_size and os.access(root / "gguf", os.W_OK)


def store_entry(gguf_path: Path, tokenizer: Any, model: Any, root: Path | None = None) -> Path | None:
    """Write ``model`` (fp32, de-quantized from ``gguf_path``) and ``tokenizer`` as a cache entry; None if it failed.

    A failure to write (full disk, permissions, a race lost to another process) only costs the speed-up.
    """
    from safetensors.torch import save_model

    root = root if root is not None else cache_root()
    if root is None:
        return None
    lock = None
    try:
        identity = gguf_identity(gguf_path, root)
        folder = entry_folder(root, identity)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(folder.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=STAGING_SUFFIX, dir=folder.parent))
        lock = _lock_folder(staging)  # held while this process writes, so no other one takes it for abandoned
    except OSError:
        return None
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the entry holds plain fp32 weights
        (staging / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        files = {}
        for path in sorted(staging.iterdir()):
            files[path.name] = {"size": path.stat().st_size, "sha256_blocks": sha256_blocks(path)}
            _fsync(path)
        manifest = {
            "format": FORMAT,
            "gguf": {"size": identity.size, "sha256": identity.sha256},
            "source": gguf_path.name,
            "converters": converter_versions(),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _fsync(staging / MANIFEST)
        _replace_folder(staging, folder, identity)
        return folder
    except Exception:  # noqa: BLE001 - any failure to write leaves the model loaded from the GGUF itself in use
        shutil.rmtree(staging, ignore_errors=True)
        return None
    finally:
        if lock is not None:
            os.close(lock)


def _lock_folder(folder: Path) -> int | None:
    """An exclusive lock on ``folder``: its open descriptor (closing it releases the lock); None without locks."""
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def _remove_stale_staging(folder: Path) -> None:
    """Delete staging folders of writes that were killed (each is the size of a model): older than a minute and not
    locked by a live writer."""
    if fcntl is None:
        return
    try:
        names = [name for name in os.listdir(folder) if name.startswith(".") and name.endswith(STAGING_SUFFIX)]
    except OSError:
        return
    for name in names:
        candidate = folder / name
        try:
            descriptor = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(descriptor).st_mtime < STALE_SECONDS:
                continue
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(candidate)
        except OSError:
            continue  # a write in progress, or already gone
        finally:
            os.close(descriptor)


def _replace_folder(staging: Path, folder: Path, identity: GGUFIdentity) -> None:
    """Rename ``staging`` to ``folder``; a damaged entry there is moved aside first; a valid one (a race) is kept."""
    if folder.exists():
        if verify_entry(folder, identity):
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", suffix=STAGING_SUFFIX, dir=folder.parent))
        folder.rename(trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)
    staging.rename(folder)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_json(path: Path) -> Mapping[str, Any]:
    """A JSON object from a small file written by this module; an empty mapping when absent, too large or broken."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_SMALL_FILE + 1)
        if len(raw) > MAX_SMALL_FILE:
            return {}
        data = parse_json(raw)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON object atomically (insertion order kept: the oldest remembered file comes first)."""
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())
