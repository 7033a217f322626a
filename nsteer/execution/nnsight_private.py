"""Every private nnsight name nsteer relies on, in one place (nnsight 0.8.1).

nnsight offers no public way to do these four things, so nsteer reaches inside it here and nowhere else.
``tests/test_nnsight_private.py`` checks each name against the installed nnsight and fails naming the symbol
that moved, so an nnsight upgrade breaks one test, not a remote run.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from typing import Any

#: (module, attribute path) of every private nnsight name used below, and of the public RemoteBackend methods
#: nsteer's backend overrides or calls (a rename there would silently bypass nsteer's deadline or result loading).
NNSIGHT_NAMES = (
    ("nnsight.intervention.backends.remote", "_READ_TIMEOUT"),
    ("nnsight.intervention.backends.remote", "RemoteBackend._push"),
    ("nnsight.intervention.backends.remote", "RemoteBackend.submit"),
    ("nnsight.intervention.backends.remote", "RemoteBackend.poll"),
    ("nnsight.intervention.backends.remote", "RemoteBackend.download_result"),
    ("nnsight.intervention.backends.remote", "RemoteBackend.finalize"),
    ("nnsight.modeling.mixins.remotable", "Remotable._remoteable_get_env"),
    ("nnsight.modeling.mixins.remotable", "Remotable.to_model_key"),
)


def wrapped_module(model: Any) -> Any:
    """The Hugging Face module an nnsight model wraps (``Envoy._module``, set on every instance)."""
    return model._module


def request_env(model: Any) -> dict:
    """The per-request environment nnsight sends with a remote request (``Remotable._remoteable_get_env``)."""
    return model._remoteable_get_env()


def push_result(backend: Any, result: Any, tracer: Any) -> None:
    """Put a remote result into the caller's frame as the blocking client does (``RemoteBackend._push``)."""
    backend._push(result, tracer)


@contextlib.contextmanager
def bounded_read_timeout(deadline: float) -> Iterator[None]:
    """Bound nnsight's HTTP read timeout (the module global ``_READ_TIMEOUT``, 600 s) by what is left of the
    ``deadline`` (a ``time.monotonic()`` value), restoring it afterwards."""
    import nnsight.intervention.backends.remote as remote_module

    original = remote_module._READ_TIMEOUT
    remote_module._READ_TIMEOUT = max(0.5, min(original, deadline - time.monotonic()))
    try:
        yield
    finally:
        remote_module._READ_TIMEOUT = original


def read_timeout() -> float:
    """nnsight's current HTTP read timeout in seconds (``_READ_TIMEOUT``; bounded by :func:`bounded_read_timeout`)."""
    import nnsight.intervention.backends.remote as remote_module

    return float(remote_module._READ_TIMEOUT)


def missing_names() -> list[str]:
    """The names of :data:`NNSIGHT_NAMES` the installed nnsight lacks (empty when all are there)."""
    missing = []
    for module_name, path in NNSIGHT_NAMES:
        try:
            node: Any = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{path}")
            continue
        for part in path.split("."):
            if not hasattr(node, part):
                missing.append(f"{module_name}.{path}")
                break
            node = getattr(node, part)
    return missing
