"""pytest fixtures for the mock NDIF server.

In a conftest (or a test module)::

    from mock_ndif.fixture import mock_ndif, mock_ndif_server  # noqa: F401

(``tests/`` is on ``sys.path`` under pytest's default import mode while it has no
``__init__.py``; with one, import ``tests.mock_ndif.fixture`` instead -- but only
one of the two spellings, or the module and its server exist twice.)

* ``mock_ndif_server`` (session): one ``MockNDIF`` for the session, its worker
  process and a fake-Hub cache of the tiny models. Stopped at session end.
* ``mock_ndif`` (function): resets the server (no failure, default key), points
  nnsight at it for the test -- ``CONFIG.API.HOST`` / ``CONFIG.API.APIKEY`` (and
  ``NDIF_HOST`` / ``NDIF_API_KEY``), Hub ids resolved offline from the fake Hub --
  silences the status display, and yields a ``MockNDIFHandle``.

``mock_ndif_fixtures(...)`` builds the same pair with other settings (deadline,
models, import strictness, names) for suites that need them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import tiny_models
from .fake_hub import publish_model, use_fake_hub, write_fake_hub
from .server import DEFAULT_API_KEY, MockNDIF

__all__ = [
    "MockNDIFHandle",
    "mock_ndif",
    "mock_ndif_fixtures",
    "mock_ndif_server",
    "running_mock_ndif",
    "deadline_backend",
    "wait_for_result",
]


@contextlib.contextmanager
def running_mock_ndif(
    hub_cache: str | os.PathLike,
    deployed: Iterable[str] | None = None,
    **options: Any,
) -> Iterator[MockNDIF]:
    """Write the fake Hub into ``hub_cache``, start a ``MockNDIF`` on it, stop it after."""
    write_fake_hub(hub_cache)
    server = MockNDIF(hub_cache, deployed=tuple(deployed or tiny_models.DEPLOYED), **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class MockNDIFHandle:
    """What a test gets: the server, its url and key, and model builders."""

    server: MockNDIF
    url: str
    api_key: str
    hub_cache: Path

    def fail(self, kind: str | None, **options: Any) -> None:
        """Make the server misbehave for the rest of the test (see ``server.Failure``)."""
        self.server.fail(kind, **options)

    def publish(self, repo_id: str, model: Any, tokenizer: Any, deploy: bool = True) -> str:
        """Host your own transformers model under a Hub-style id for the rest of the session.

        Writes it into the fake Hub (config, safetensors, tokenizer), lets this
        process resolve the id offline, and (``deploy``) has the server run it.
        ``remote_model(repo_id)`` / ``local_model(repo_id)`` then work as for the
        built-in tiny models. Ids are single-use per session.
        """
        import nnsight.modeling.huggingface as nnsight_hf

        publish_model(self.hub_cache, repo_id, model, tokenizer)
        nnsight_hf._ID_CACHE[repo_id] = repo_id
        if deploy:
            self.server.deploy(repo_id)
        return repo_id

    def remote_model(self, repo_id: str = tiny_models.DEFAULT_MODEL, **kwargs: Any) -> Any:
        """The client-side handle: a *meta* ``TransformersModel`` named by its Hub id.

        Built exactly as real code builds a remote model, with two arguments that
        nnsight 0.8.1 + transformers 5 need offline and online alike: ``task``
        (else nnsight asks the Hub for the pipeline tag) and ``tokenizer=repo_id``
        (else the meta pipeline cannot guess a tokenizer and raises).
        """
        from nnsight import TransformersModel

        kwargs.setdefault("task", "text-generation")
        kwargs.setdefault("tokenizer", repo_id)
        return TransformersModel(repo_id, **kwargs)

    def local_model(self, repo_id: str = tiny_models.DEFAULT_MODEL, **kwargs: Any) -> Any:
        """The same model with real weights, from the same fake-Hub files as the server's."""
        from nnsight import TransformersModel

        kwargs.setdefault("task", "text-generation")
        return TransformersModel(repo_id, dispatch=True, **kwargs)

    def backend(self, model: Any, blocking: bool = False, **kwargs: Any) -> Any:
        """An explicit ``RemoteBackend`` for ``model`` aimed at this server."""
        from nnsight.intervention.backends.remote import RemoteBackend

        kwargs.setdefault("api_key", self.api_key)
        return RemoteBackend(
            model.to_model_key(),
            host=self.url,
            env=model._remoteable_get_env(),
            blocking=blocking,
            **kwargs,
        )


def wait_for_result(backend: Any, timeout_s: float = 30.0, interval_s: float = 0.05) -> dict:
    """Poll a non-blocking backend until its job completes; ``TimeoutError`` past the deadline.

    This is the client-side deadline the blocking client lacks: ``backend()``
    (== ``backend.poll()`` once a job id is set) returns ``None`` while the job
    runs, the saves dict on COMPLETED, and raises ``RemoteError`` on ERROR.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = backend()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"NDIF job {backend.job_id} did not finish within {timeout_s:.0f} s "
                f"(last status: {getattr(backend.status, 'value', backend.status)})"
            )
        time.sleep(interval_s)


class _DeadlineDisplay:
    """Stands in for ``StatusDisplay`` to give the *blocking* client a deadline.

    nnsight 0.8.1's blocking wait (``RemoteBackend.request``) loops on
    ``websocket.recv()``; when the display is ``enabled`` it sets a 0.1 s socket
    timeout and calls ``display.refresh()`` on every timeout -- and swallows the
    timeout (so ``websocket.setdefaulttimeout`` cannot end the wait). Raising from
    ``refresh`` is the one way out; the backend's ``finally`` closes the socket.
    Relies on those internals: prefer ``blocking=False`` + ``wait_for_result``.
    """

    verbose = False

    def __init__(self, timeout_s: float) -> None:
        self.enabled = True  # makes request() poll with a 0.1 s socket timeout
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.response = None

    def update(self, response: Any) -> None:
        self.response = response
        self.refresh()

    def refresh(self) -> None:
        if time.monotonic() >= self.deadline:
            status = getattr(getattr(self.response, "status", None), "value", None)
            raise TimeoutError(f"NDIF job did not finish within {self.timeout_s:.0f} s (last status: {status})")


def deadline_backend(model: Any, timeout_s: float, **kwargs: Any) -> Any:
    """A blocking ``RemoteBackend`` for ``model`` that raises ``TimeoutError`` past ``timeout_s``.

    Use as ``model.trace(prompt, backend=deadline_backend(model, 60))``. Host and
    key come from ``CONFIG`` unless given. The clock starts now.
    """
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend(model.to_model_key(), env=model._remoteable_get_env(), blocking=True, **kwargs)
    backend.display = _DeadlineDisplay(timeout_s)
    return backend


def mock_ndif_fixtures(
    server_name: str = "mock_ndif_server",
    handle_name: str = "mock_ndif",
    deployed: Iterable[str] | None = None,
    quiet: bool = True,
    **options: Any,
) -> tuple[Any, Any]:
    """Build a (session-scoped server, function-scoped handle) fixture pair.

    ``options`` go to ``MockNDIF`` (``job_timeout_s``, ``strict_imports``,
    ``api_keys``, ``inline_limit``, ``blocked``, ...). ``quiet`` switches off
    nnsight's remote status display and debug mode for each test: with the
    display on (it is by default, and ``pytest -v`` turns debug on), the blocking
    client re-arms its websocket timeout every 0.1 s, so a client-side socket
    timeout never fires.
    """

    @pytest.fixture(scope="session", name=server_name)
    def server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockNDIF]:
        cache = tmp_path_factory.mktemp("mock-ndif-hub")
        with running_mock_ndif(cache, deployed=deployed, **options) as server:
            yield server

    @pytest.fixture(name=handle_name)
    def handle_fixture(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[MockNDIFHandle]:
        from nnsight import CONFIG

        server: MockNDIF = request.getfixturevalue(server_name)
        server.reset()
        api_key = sorted(server.api_keys)[0] if server.api_keys else DEFAULT_API_KEY
        monkeypatch.setattr(CONFIG.API, "HOST", server.url)
        monkeypatch.setattr(CONFIG.API, "APIKEY", api_key)
        monkeypatch.setenv("NDIF_HOST", server.url)
        monkeypatch.setenv("NDIF_API_KEY", api_key)
        if quiet:
            monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", False)
            monkeypatch.setattr(CONFIG.APP, "DEBUG", False)
        with use_fake_hub(server.hub_cache, tiny_models.TINY_MODELS):
            yield MockNDIFHandle(server, server.url, api_key, Path(server.hub_cache))
        server.reset()  # releases anything a failure mode still holds

    return server_fixture, handle_fixture


mock_ndif_server, mock_ndif = mock_ndif_fixtures()
