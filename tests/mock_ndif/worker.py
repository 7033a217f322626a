"""Execution worker for the mock NDIF server: runs shipped traces, far from the client's code.

Started by ``server.py`` as ``python -I worker.py`` (isolated mode: no script
directory, no current directory, no ``PYTHON*`` variables, no user site on
``sys.path``), in a scratch working directory. On top of that it removes the
repository from ``sys.path`` and poisons every *blocked* package
(``MOCK_NDIF_BLOCKED``, default ``nsteer``) so that ``import nsteer`` raises
``ModuleNotFoundError`` here: a request that needs client-only code fails exactly
as it would on NDIF.

What it does per job, like an NDIF model actor:

1. build (once per model key) the model the key names, the way NDIF does:
   ``Remotable.from_model_key(key, dispatch=True)``, resolving the Hub id through
   the offline fake-Hub cache the server points ``HF_HUB_CACHE`` at;
2. apply the request's ``env`` (``_remoteable_set_env``);
3. deserialize the payload with the model's persistent objects, under an import
   whitelist modelled on NDIF's;
4. run the block (imports made by the shipped code itself are checked against the
   same whitelist), collect the values marked with ``.save()``;
5. ``torch.save`` them (zstd-compressed when the request was) and send the bytes back.

It imports nothing from the repository; it talks to the server over a
``multiprocessing.connection`` socket on 127.0.0.1 (address and auth key in the
environment).
"""

from __future__ import annotations

import builtins
import importlib.abc
import io
import os
import pickle
import socket
import struct
import sys
import time
import traceback
from typing import Any

# --------------------------------------------------------------------------- isolation

_REPO_ROOT = os.environ.get("MOCK_NDIF_REPO_ROOT", "")
_BLOCKED = tuple(name for name in os.environ.get("MOCK_NDIF_BLOCKED", "nsteer").split(",") if name)


def _under_repo(path: str) -> bool:
    """Whether a ``sys.path`` entry exposes the repository's own code.

    The virtual environment may live inside the repository (``.venv``): its
    ``site-packages`` stays; the repository root and its other folders go.
    """
    if not _REPO_ROOT:
        return False
    path = os.path.abspath(path or os.getcwd())
    inside = path == _REPO_ROOT or path.startswith(_REPO_ROOT + os.sep)
    return inside and "site-packages" not in path and "dist-packages" not in path


class _BlockClientPackages(importlib.abc.MetaPathFinder):
    """Refuse the client-only packages, whatever finder might otherwise find them."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        root = fullname.split(".")[0]
        if root in _BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (not installed on the mock NDIF server)",
                name=fullname,
            )
        return None


def isolate() -> None:
    sys.path[:] = [entry for entry in sys.path if entry and not _under_repo(entry)]
    for name in list(sys.modules):
        if name.split(".")[0] in _BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, _BlockClientPackages())


isolate()

# --------------------------------------------------------------------------- whitelist

#: Module prefixes a request may name while it is unpickled or imports while it
#: runs. Modelled on NDIF's server (ndif-team/ndif, ray/nn/security/
#: protected_environment.py: WHITELISTED_MODULES + the deserialization extras),
#: with the whole ``nnsight`` package allowed because 0.8.1 moved its internals.
WHITELIST = (
    "builtins",
    "copyreg",
    "_codecs",
    "pickle",
    "cloudpickle",
    "nnsight",
    "torch",
    "collections",
    "time",
    "numpy",
    "sympy",
    "nnterp",
    "math",
    "einops",
    "urllib3",
    "typing",
    "_operator",
    "operator",
    "pandas",
    "enum",
)


def whitelisted(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in WHITELIST)


def _not_whitelisted(module: str) -> ImportError:
    return ImportError(f"Module {module} is not whitelisted")


STRICT = os.environ.get("MOCK_NDIF_STRICT_IMPORTS", "1") == "1"


def _make_unpickler() -> type:
    from cloudpickle import cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudUnpickler

    def guarded_subimport(name: str) -> Any:
        # A module object the shipped code references (pickled by name).
        if not whitelisted(name):
            __import__(name)  # absent here: ModuleNotFoundError, like NDIF
            raise _not_whitelisted(name)
        return cp.subimport(name)

    def guarded_dynamic_subimport(name: str, vars: dict) -> Any:
        # A module shipped by value (``nnsight.register``): its globals came along.
        return cp.dynamic_subimport(name, vars)

    class WhitelistUnpickler(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if STRICT and not whitelisted(module):
                # Not on the list: NDIF refuses it. Import it anyway first so a
                # package that does not exist here reports ModuleNotFoundError.
                __import__(module)
                raise _not_whitelisted(module)
            found = super().find_class(module, name)
            if found is cp.subimport and STRICT:
                return guarded_subimport
            if found is cp.dynamic_subimport:
                return guarded_dynamic_subimport
            return found

    return WhitelistUnpickler


_LIBRARY_PREFIXES = tuple(
    {os.path.dirname(os.__file__)}  # the standard library
    | {p for p in sys.path if "site-packages" in p or "dist-packages" in p}
)


class _ImportGuard:
    """While a job runs, refuse imports *made by shipped code* that NDIF would refuse.

    Library code (torch, transformers, nnsight, the standard library) imports
    freely; only a frame whose file is not a library file -- the trace body, or a
    function shipped by value -- is held to the whitelist.
    """

    def __init__(self) -> None:
        self.original = builtins.__import__

    def __call__(self, name, globals=None, locals=None, fromlist=(), level=0):
        caller = sys._getframe(1).f_code.co_filename
        if (
            level == 0
            and not caller.startswith(_LIBRARY_PREFIXES)
            and not caller.startswith("<frozen")
            and not whitelisted(name)
        ):
            raise _not_whitelisted(name)
        return self.original(name, globals, locals, fromlist, level)

    def __enter__(self) -> _ImportGuard:
        if STRICT:
            builtins.__import__ = self
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.__import__ = self.original


# --------------------------------------------------------------------------- execution

_MODELS: dict[str, Any] = {}


def load_model(model_key: str) -> Any:
    model = _MODELS.get(model_key)
    if model is None:
        from nnsight.modeling.mixins.remotable import Remotable

        model = Remotable.from_model_key(model_key, dispatch=True)
        model._module.eval()
        _MODELS[model_key] = model
    return model


def run_job(model_key: str, env: dict, compress: bool, blob: bytes, fail: str | None) -> bytes:
    import torch
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc

    model = load_model(model_key)
    model._remoteable_set_env(env or {})
    if fail == "exec_error":
        raise RuntimeError("mock NDIF: injected server-side failure")

    # nnsight memoizes each file's source (SOURCES) and each ``with`` site's
    # compiled block (BLOCKS) for the life of the process, keyed by the *client's*
    # file name. Server-side, nested blocks (``tracer.invoke(...)``, inner traces
    # of a session) are captured from the source this request registered in
    # linecache, so a previous request from the same client file must not shadow it.
    from nnsight.tracing.globals import BLOCKS, SOURCES

    SOURCES.clear()
    BLOCKS.clear()
    tracer = RequestModel.deserialize(
        blob,
        model._remoteable_persistent_objects(),
        compress=compress,
        unpickler=_make_unpickler(),
    )
    inc()
    try:
        with _ImportGuard():
            tracer.execute(tracer.info.code)
        saves = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in _saves()}
    finally:
        dec()

    buffer = io.BytesIO()
    torch.save(saves, buffer)
    data = buffer.getvalue()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=6).compress(data)
    return data


def describe(exception: BaseException) -> str:
    text = "".join(traceback.format_exception(exception))
    return f"{text}\n{type(exception).__name__}: {exception}"


class _Channel:
    """Length-prefixed pickles over the loopback socket to the server (its twin is there)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(struct.pack("!Q", len(data)) + data)

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def recv(self) -> Any:
        (length,) = struct.unpack("!Q", self._exact(8))
        return pickle.loads(self._exact(length))


def main() -> None:
    host, port = os.environ["MOCK_NDIF_WORKER_ADDR"].rsplit(":", 1)
    token = os.environ["MOCK_NDIF_WORKER_KEY"]
    connection = _Channel(socket.create_connection((host, int(port)), timeout=30))
    connection.sock.settimeout(None)

    started = time.time()
    import nnsight
    import torch  # noqa: F401  (warm the heavy imports before saying hello)
    import transformers
    from nnsight.modeling.mixins.remotable import Remotable  # noqa: F401
    from nnsight.schema.request import RequestModel  # noqa: F401

    try:
        import nsteer  # noqa: F401

        nsteer_importable = True
    except ImportError:
        nsteer_importable = False
    connection.send(
        (
            "hello",
            token,
            {
                "pid": os.getpid(),
                "nsteer_importable": nsteer_importable,
                "blocked": list(_BLOCKED),
                "sys_path": list(sys.path),
                "python": sys.version,
                "nnsight": nnsight.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "startup_s": time.time() - started,
            },
        )
    )

    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "load":
            _, model_key = message
            try:
                load_model(model_key)
                connection.send(("loaded", model_key, None))
            except BaseException as exception:  # noqa: BLE001
                connection.send(("loaded", model_key, describe(exception)))
            continue
        if kind == "run":
            _, job_id, model_key, env, compress, blob, fail = message
            started = time.time()
            try:
                data = run_job(model_key, env, compress, blob, fail)
                connection.send(("done", job_id, data, time.time() - started))
            except BaseException as exception:  # noqa: BLE001 - reported to the client
                connection.send(("error", job_id, describe(exception), time.time() - started))


if __name__ == "__main__":
    main()
