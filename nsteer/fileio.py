"""File input and output for every stage: user paths and ``builtin:`` names, bounded reads, safe YAML and JSON,
atomic writes, file locks.

Everything read here is untrusted data. Reads refuse what is not a regular file (a folder, a pipe, a device) before
opening it, and stop at a size bound instead of reading without end. YAML is scanned as a stream of events before any
document is built, so aliases that would expand a few hundred bytes into gigabytes (or into a cycle) are refused
while they are still cheap to count. Writes go to a temporary file named as nsteer's own, and are renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from nsteer.constants import BUILTIN_PREFIX
from nsteer.errors import FileError, NsteerError

MIB = 1 << 20
MAX_RECIPE_BYTES = 1 * MIB  # a recipe is a page of settings; a megabyte is already far beyond any real one
MAX_DATA_BYTES = 64 * MIB  # prompt sets, phrasings, IFEval JSONL: tens of thousands of prompts fit
MAX_LINE_CHARS = 1 * MIB  # one JSONL line, or one prompt: ~250k tokens, beyond every model's context
MAX_NESTING = 100  # YAML / JSON nesting depth; recipes and data files use fewer than 10 levels
MAX_ALIAS_NODES = 100_000  # how many nodes YAML aliases may add to a document in all
TEMP_SUFFIX = ".nsteer-tmp"  # temporary files of atomic writes: `.NAME.RANDOM.nsteer-tmp` beside their target
STALE_TEMP_SECONDS = 60.0  # an unlocked temporary file older than this belongs to a write that was killed

try:
    import fcntl
except ImportError:  # pragma: no cover - platforms without flock: writes stay atomic, only the locks are skipped
    fcntl = None  # type: ignore[assignment]


def user_cache_dir() -> Path | None:
    """nsteer's folder in the user's cache: ``$NSTEER_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsteer``, else
    ``~/.cache/nsteer``; None when there is no home directory to put it in. Nothing is created here."""
    explicit = os.environ.get("NSTEER_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    try:
        return (Path(base) if base else Path.home() / ".cache") / "nsteer"
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------------------- paths


def builtin_name(source: str) -> str | None:
    """The name in ``builtin:<name>`` (data that ships with nsteer), or None for anything else."""
    return source[len(BUILTIN_PREFIX) :] if source.startswith(BUILTIN_PREFIX) else None


def expand_user(source: str | Path) -> Path:
    """``source`` as a path with ``~`` expanded (left as is when that home directory is unknown)."""
    try:
        return Path(source).expanduser()
    except RuntimeError:  # ~someone who does not exist: the file will simply not be found
        return Path(source)


def user_path(source: str, base_dir: Path | None = None) -> Path:
    """A path a user wrote: ``~`` expanded (left as is when that home is unknown), relative to ``base_dir``."""
    if "\x00" in source:
        raise FileError(f"The path {source!r} contains a NUL character; no file can have that name.")
    path = expand_user(source)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return path


def input_path(source: str, base_dir: Path) -> Path:
    """A file a recipe names (a steer entry's ``vector``): relative to the recipe's folder ``base_dir``, or, when no
    file is there but one is relative to the current directory, that one. Absolute paths and ``~`` stay as given."""
    beside_recipe = user_path(source, base_dir)
    if is_file(beside_recipe):
        return beside_recipe
    here = user_path(source)
    return here if is_file(here) else beside_recipe


def is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; False for names the file system refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def path_kind(path: str | Path) -> str:
    """What is at ``path``: "a file", "a folder", "a named pipe (FIFO)", a device, "nothing" (or a broken link)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "nothing"
    except (OSError, ValueError):  # a name too long, a NUL byte, a folder on the way that is a file
        return "nothing"
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_file(path: str | Path, what: str, error: type[NsteerError], hint: str = "") -> Path:
    """``path`` if it is a regular file; else ``error`` saying what stands there instead (nothing, a folder, a pipe)."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "a file":
        return path
    tail = f" {hint}" if hint else ""
    if kind == "nothing":
        raise error(f"{what[:1].upper()}{what[1:]} not found: {path}.{tail}")
    raise error(f"{path} is {kind}, not {_article(what)} {what}.{tail}")


def read_bytes(path: str | Path, what: str, error: type[NsteerError], *, limit: int, hint: str = "") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else is ``error`` naming the problem."""
    path = require_file(path, what, error, hint)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)  # non-blocking: a pipe swapped in after the check must not hang the open
    except OSError as problem:
        raise error(f"{path}: the {what} cannot be read ({problem.strerror or problem}).") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise error(f"{path} is {path_kind(path)}, not {_article(what)} {what}.")
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            payload = stream.read(limit + 1)
    except OSError as problem:
        raise error(f"{path}: the {what} cannot be read ({problem.strerror or problem}).") from None
    finally:
        os.close(descriptor)
    if len(payload) > limit:
        raise error(f"{path}: the {what} is larger than {_size(limit)}, the most nsteer reads; give a smaller file.")
    return payload


def read_text(path: str | Path, what: str, error: type[NsteerError], *, limit: int, hint: str = "") -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes (see ``read_bytes``); other encodings are refused."""
    payload = read_bytes(path, what, error, limit=limit, hint=hint)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = payload.count(b"\n", 0, problem.start) + 1
        raise error(
            f"{path}, line {line}: the {what} is not UTF-8 text ({problem.reason} at byte {problem.start}); "
            "save it as UTF-8."
        ) from None


def text_lines(text: str, path: Path, what: str, error: type[NsteerError]) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each non-blank line of ``text``; a line longer than MAX_LINE_CHARS is ``error``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line) > MAX_LINE_CHARS:
            raise error(
                f"{path}, line {number}: the line is {len(line):,} characters long; lines of a {what} are limited to "
                f"{MAX_LINE_CHARS:,} (no prompt needs more than a model's context)."
            )
        if line.strip():
            yield number, line


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _size(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB else f"{limit} bytes"


# ----------------------------------------------------------------------------------------------------------- JSON


class DataFormatError(ValueError):
    """Text that JSON or YAML cannot turn into data within nsteer's bounds; ``msg`` says why, as json's errors do."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure is a ValueError with ``.msg``: syntax, nesting too deep, numbers too long."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise DataFormatError("nested too deeply (arrays or objects inside each other a thousand times)") from None
    except ValueError as problem:  # an integer of more than 4300 digits
        raise DataFormatError(_number_problem(problem)) from None


def _number_problem(problem: ValueError) -> str:
    """Python's refusal of a huge integer literal, in words for the user (not the interpreter's own advice)."""
    text = " ".join(str(problem).split())
    if "integer string conversion" in text:
        return "a number has more than 4300 digits"
    return text


# ----------------------------------------------------------------------------------------------------------- YAML


class YAMLLimitError(yaml.MarkedYAMLError):
    """A YAML document that is valid but beyond nsteer's bounds (alias expansion, cycles, nesting)."""


def _scan_events(text: str) -> None:
    """Count what the document would expand to, from its event stream, before any node is built.

    Every alias stands for a full copy of its anchored node when the document is turned into data; an anchored node's
    expanded size already includes the aliases inside it, so the copies aliases add are the sum of their anchors'
    sizes. That sum, the nesting depth and aliases to a node still open (a cycle) are checked as the events arrive.
    """
    loader = yaml.SafeLoader(text)
    try:
        sizes: dict[str, int] = {}  # anchor -> expanded node count of its node
        stack: list[list[Any]] = []  # open collections: [expanded count so far, anchor]
        added = 0

        def finish(size: int, anchor: str | None) -> None:
            if anchor:
                sizes[anchor] = size
            if stack:
                stack[-1][0] += size

        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for _, anchor in stack):
                    raise YAMLLimitError(
                        problem=f"the alias *{event.anchor} refers to a node that contains it, an endless cycle",
                        problem_mark=event.start_mark,
                    )
                size = sizes.get(event.anchor, 1)  # an unknown anchor: the composer reports it
                added += size
                if added > MAX_ALIAS_NODES:
                    raise YAMLLimitError(
                        problem=f"its aliases (*{event.anchor} and others) expand the document by more than "
                        f"{MAX_ALIAS_NODES:,} values; write the values out, or nest fewer aliases",
                        problem_mark=event.start_mark,
                    )
                finish(size, None)
            elif isinstance(event, yaml.ScalarEvent):
                finish(1, event.anchor)
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([1, event.anchor])
                if len(stack) > MAX_NESTING:
                    raise YAMLLimitError(
                        problem=f"it is nested more than {MAX_NESTING} levels deep", problem_mark=event.start_mark
                    )
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                size, anchor = stack.pop()
                finish(size, anchor)
    finally:
        loader.dispose()


def parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The data of a one-document YAML text and its node tree (for line numbers), with nsteer's bounds enforced.

    Only YAML's safe types are built (no Python tags). Every failure is a ``yaml.YAMLError``; those with a
    ``problem_mark`` say where. The node tree is composed apart from the data, so merge keys (``<<``) built into the
    data leave the tree as written.
    """
    _scan_events(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader: plain data types only
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise YAMLLimitError(problem=f"it is nested more than {MAX_NESTING} levels deep") from None
    except ValueError as problem:  # an integer of more than 4300 digits
        raise YAMLLimitError(problem=_number_problem(problem)) from None
    return data, node


# --------------------------------------------------------------------------------------------------------- writes


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files of writes that were killed: ours by name, older than a minute, and no longer locked.

    A live write holds an exclusive lock on its temporary file for as long as it exists, so a file whose lock can be
    taken belongs to no running write; the age check covers the instant between creating a file and locking it.
    """
    if fcntl is None:
        return
    try:
        names = [name for name in os.listdir(folder) if name.startswith(".") and name.endswith(TEMP_SUFFIX)]
    except OSError:
        return
    for name in names:
        candidate = folder / name
        try:
            descriptor = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < STALE_TEMP_SECONDS:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a write in progress
            os.unlink(candidate)
        except OSError:
            continue
        finally:
            os.close(descriptor)


def check_output_path(path: str | Path, what: str = "file") -> Path:
    """Refuse an output path that names a folder (or a pipe, a device): the write would fail after all the work."""
    path = Path(path)
    kind = path_kind(path)
    if kind not in ("a file", "nothing"):
        raise FileError(f"{path} is {kind}; give the path of the {what} to write (a new name, or a file inside it).")
    return path


def writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it takes a file, so an unwritable output is found before a model runs.

    The proof is a real (at once removed) file: permission bits, read-only file systems, ACLs and quotas all answer.
    """
    folder = Path(folder)
    kind = path_kind(folder)
    if kind not in ("a folder", "nothing"):
        raise FileError(f"The {what} {folder} is {kind}; give a folder (a file stands where a folder is needed).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".nsteer-probe.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as problem:
        where = f" ({problem.filename})" if problem.filename and str(problem.filename) != str(folder) else ""
        raise FileError(
            f"The {what} {folder} cannot be written{where}: {problem.strerror or problem}. "
            "Choose another folder, or fix its permissions."
        ) from None
    return folder


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, and rename it onto ``path``.

    Readers see the old file or the new one, never half of one. The temporary file is ``.NAME.RANDOM.nsteer-tmp``,
    locked while it exists; one left by a killed write is removed by the next write to that folder.
    """
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    temporary = Path(name)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        # mkstemp creates the file private (0600); give it the permissions a plain open() would (0666 minus umask).
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(descriptor, 0o666 & ~umask)
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)  # releases the lock, after the rename
    return path


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(payload))


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, tuples lists, so the JSON is valid everywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON (NaN as null) atomically; returns the path."""
    return atomic_write_bytes(path, (json.dumps(json_safe(data), indent=1, ensure_ascii=False) + "\n").encode())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 atomically; returns the path."""
    return atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder of ``path`` (created if needed) for a read-modify-write of ``path``.

    Two nsteer processes that update files of one folder (a search recording its setting, a compute replacing the
    vector) take turns instead of one silently undoing the other. Where the file system cannot lock, it runs unlocked.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
