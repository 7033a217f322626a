"""The NDIF backend: the API key, one request submitted and polled under nsteer's deadline, and result loading.

nnsight's blocking client waits on a websocket with no overall deadline. :class:`NdifBackend` instead posts each
request and polls for its result (nnsight's non-blocking protocol), gives up at nsteer's deadline, turns every
failure into a RemoteError (:mod:`nsteer.execution.errors`), and hands the saved values back to the calling frame
exactly as the blocking client would. The key goes only into the request headers: it is never printed, logged,
written to a file, or put into an exception message.

What comes back from NDIF is loaded by one function, :func:`load_result`.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Any

from nnsight.intervention.backends.remote import RemoteBackend

from nsteer.errors import RemoteError
from nsteer.execution.errors import KEY_URL, DeadlinePassed, safe_cause, translate_error
from nsteer.execution.nnsight_private import bounded_read_timeout, push_result, read_timeout, request_env

_log = logging.getLogger(__name__)

#: Seconds nsteer waits for one NDIF request (submission, queue, run and download) before giving up.
#: Recipes set it with ``model.timeout``; the SDK with ``open_model(..., timeout=...)``.
DEFAULT_TIMEOUT = 900.0

MISSING_KEY = (
    "No NDIF API key found. Create one at " + KEY_URL + ", then either export it as NDIF_API_KEY in the shell "
    "that runs nsteer, or save it once with: "
    "python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('YOUR_KEY')\"."
)

# Poll interval for a running job: starts short (a small job is back in well under a second), grows to the cap.
_POLL_FIRST_S = 0.05
_POLL_GROWTH = 1.3
_POLL_MAX_S = 2.0


def api_key() -> str | None:
    """The NDIF API key nnsight will send: ``nnsight.CONFIG`` (config file, ``NDIF_API_KEY`` at import) or the env."""
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or None


def require_api_key() -> str:
    """The API key, or a RemoteError saying how to get one (checked before anything is sent)."""
    key = api_key()
    if not key:
        raise RemoteError(MISSING_KEY)
    return key


def ndif_host() -> str:
    """The NDIF API host requests go to (``nnsight.CONFIG.API.HOST``; ``NDIF_HOST`` sets it at nnsight import)."""
    from nnsight import CONFIG

    return CONFIG.API.HOST


#: The most bytes an NDIF result may hold, downloaded or decompressed: nsteer's results are per-layer sums and token
#: ids, far smaller; a download or a compressed stream that goes past it is stopped there.
MAX_RESULT_BYTES = 4 << 30
_CONNECT_S = 10.0  # seconds to connect for a result download (nnsight's own value)


def _size(limit: int) -> str:
    return f"{limit >> 30} GiB" if limit >= 1 << 30 else f"{limit >> 20} MiB"


def load_result(content: bytes, *, compressed: bool) -> Any:
    """The saved values of a finished NDIF request, from the bytes NDIF sent back (zstd-compressed when the request
    was), loaded as data only. Every result, downloaded or sent inline, passes through here.

    nnsight itself unpickles results with ``weights_only=False``, so whoever answers at the NDIF host could run code
    in this process. Here the result is read by torch's weights-only unpickler, which builds tensors, numbers,
    strings and containers and nothing else; anything more is refused. What the values must be (type, shape, dtype,
    finite) is checked where they are used (:mod:`nsteer.execution.results`).
    """
    import torch

    if compressed:
        content = _decompress(content)
    if len(content) > MAX_RESULT_BYTES:
        raise RemoteError(_not_data(f"it is larger than {_size(MAX_RESULT_BYTES)}"))
    try:
        value = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ...: all mean "not data"
        reason = " ".join(str(error).split())
        reason = reason.split(". ")[0] if "Weights only load failed" not in reason else "it asks to run code"
        raise RemoteError(_not_data(reason[:200])) from None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise RemoteError(_not_data(f"it is a {type(value).__name__}, not the mapping of saved names nnsight sends"))
    return value


def _decompress(content: bytes) -> bytes:
    """The zstd-decompressed ``content``, read in chunks and stopped past :data:`MAX_RESULT_BYTES` (a few bytes
    of a compressed stream can expand to gigabytes)."""
    import zstandard

    chunks, size = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(content)) as reader:
            while chunk := reader.read(1 << 24):
                size += len(chunk)
                if size > MAX_RESULT_BYTES:
                    raise RemoteError(_not_data(f"it expands to more than {_size(MAX_RESULT_BYTES)}"))
                chunks.append(chunk)
    except zstandard.ZstdError as error:
        raise RemoteError(_not_data(f"it is not a zstd stream ({error})")) from None
    return b"".join(chunks)


def _not_data(reason: str) -> str:
    host = ndif_host()
    return (
        f"The result NDIF sent back was refused: {reason}. nsteer reads results as data only (tensors, numbers, "
        f"lists, mappings). Requests go to {host}: if that is not NDIF (NDIF_HOST, nnsight.CONFIG.API.HOST), correct "
        "it; if it is, run again and report the job if it repeats."
    )


class Submitted(Exception):
    """Raised by a submit-only backend once its request is posted: nothing comes back in this process."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class _StatusLog:
    """Stands in for nnsight's status display (which writes to stdout): logs status changes instead."""

    enabled = False
    verbose = False

    def __init__(self) -> None:
        self.status: str | None = None

    def update(self, response: Any) -> None:
        status = getattr(getattr(response, "status", None), "value", None)
        if status != self.status:
            self.status = status
            _log.info("NDIF job %s: %s", getattr(response, "id", "?"), status)

    def refresh(self) -> None:
        pass


class NdifBackend(RemoteBackend):
    """nnsight's RemoteBackend, driven by submit + poll under nsteer's deadline, with errors nsteer can explain.

    Called by nnsight when a trace or session exits: posts the request, polls until the saved values are back
    (or ``timeout`` seconds passed), and pushes them into the caller's frame like the blocking client. With
    ``submit_only`` it raises :class:`Submitted` once the request is posted. The backend itself never travels with
    the request (nnsight drops it from the pickled tracer).
    """

    def __init__(
        self,
        model: Any,
        *,
        model_id: str,
        timeout: float,
        api_key: str,
        submit_only: bool = False,
        job_id: str | None = None,
        model_key: str | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__(
            model_key or model.to_model_key(),
            host=host,
            api_key=api_key,
            env=request_env(model) if model is not None else {},
            blocking=False,
            job_id=job_id,
        )
        self.display = _StatusLog()
        self.verbose = False
        self.model_id = model_id
        self.timeout = float(timeout)
        self.submit_only = submit_only
        self.phase = "sending the request"

    def __call__(self, tracer: Any = None) -> Any:
        deadline = time.monotonic() + self.timeout
        try:
            self.phase = "sending the request"
            with bounded_read_timeout(deadline):
                self.submit(tracer)
            _log.info("NDIF job %s submitted for %s", self.job_id, self.model_id)
            if self.submit_only:
                raise Submitted(self.job_id)
            result = self.wait(deadline)
        except (Submitted, RemoteError):  # posted as a job; or nsteer's own verdict on the result
            raise
        except Exception as error:
            raise translate_error(error, backend=self) from safe_cause(error, self.api_key)
        push_result(self, result, tracer)
        return result

    def wait(self, deadline: float) -> dict:
        """Poll the submitted job until its saved values are back; :class:`DeadlinePassed` past ``deadline``."""
        interval = _POLL_FIRST_S
        while True:
            self.phase = "waiting for the result"
            with bounded_read_timeout(deadline):
                result = self.poll()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise DeadlinePassed(self.job_id)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * _POLL_GROWTH, _POLL_MAX_S)

    def download_result(self, url: Any) -> Any:
        """The result COMPLETED carried: its bytes inline, or a URL to fetch, read in chunks and given up past
        :data:`MAX_RESULT_BYTES` (nnsight's own download buffers whatever the server streams). No key is sent."""
        self.phase = "downloading the result"
        if isinstance(url, (bytes, bytearray)):
            return self.finalize(bytes(url))
        if not url:
            return None
        if not isinstance(url, str) or not url.lower().startswith(("https://", "http://")):
            raise RemoteError(_not_data("its download address is not an http(s) URL"))
        import httpx

        buffer = io.BytesIO()
        with httpx.Client(timeout=httpx.Timeout(_CONNECT_S, read=read_timeout())) as client:
            with client.stream("GET", url) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes(chunk_size=1 << 20):
                    if buffer.tell() + len(chunk) > MAX_RESULT_BYTES:
                        raise RemoteError(_not_data(f"it is larger than {_size(MAX_RESULT_BYTES)}"))
                    buffer.write(chunk)
        return self.finalize(buffer.getvalue())

    def finalize(self, content: bytes) -> Any:
        """Every result's bytes, downloaded or sent back inline, are loaded by :func:`load_result`."""
        return load_result(content, compressed=bool(self.compress))
