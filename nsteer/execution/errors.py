"""NDIF failures as RemoteErrors that say what happened and what to do; the API key never appears in one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nsteer.errors import RemoteError

KEY_URL = "https://login.ndif.us/"
STATUS_URL = "https://nnsight.net/status/"


class DeadlinePassed(TimeoutError):
    """nsteer's own deadline for one NDIF request passed."""


def scrub(text: str, key: str | None) -> str:
    """``text`` with the API key replaced by a placeholder."""
    return text.replace(key, "<api key>") if key and len(key) >= 4 else text


def safe_cause(error: BaseException, key: str | None) -> BaseException | None:
    """The original exception as the cause, unless its text holds the key (then none)."""
    chain: BaseException | None = error
    seen: set[int] = set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if key and key in str(chain):
            return None
        chain = chain.__cause__ or chain.__context__
    return error


def translate_error(error: BaseException, *, backend: Any) -> RemoteError:
    """Turn whatever the nnsight client raised into a RemoteError that says what happened and what to do.

    ``backend`` is the :class:`nsteer.execution.ndif.NdifBackend` that ran the request (its model id, host, job id,
    deadline, phase and last status go into the message).
    """
    import httpx
    from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

    try:
        import websocket
    except ImportError:  # pragma: no cover - websocket-client ships with nnsight
        websocket = None
    if isinstance(error, RemoteError):  # nsteer's own verdict (a refused result): already says what to do
        return error
    model, host, job = backend.model_id, backend.host, backend.job_id
    timeout = backend.timeout
    job_text = f" (job {job})" if job else ""
    retry_timeout = (
        f"Raise the deadline (recipe: model.timeout, now {timeout:g} s; SDK: open_model(..., timeout=...)) and rerun, "
        "or submit without waiting and collect later (`--no-wait`, then `nsteer collect JOB`). "
        f"NDIF's queue and model state: {STATUS_URL}"
    )
    dropped = (
        "Check your network connection and that NDIF is up (" + STATUS_URL + "), then rerun: vector files already "
        "written are kept and skipped."
    )

    def message(text: str) -> RemoteError:
        return RemoteError(scrub(text, backend.api_key))

    if isinstance(error, DeadlinePassed):
        return message(
            f"NDIF did not finish the request for {model}{job_text} within nsteer's deadline of {timeout:g} s "
            f"(last status: {backend.display.status or 'unknown'}). The model may be loading or the queue long. "
            + retry_timeout
        )
    cause = error.__cause__ if isinstance(error, NnsightRemoteError) else error
    text = str(error)
    if isinstance(error, NnsightRemoteError) and text.startswith("Failed to send request: "):
        detail = text[len("Failed to send request: ") :]
        if isinstance(cause, httpx.HTTPStatusError):
            return _http_status_message(cause.response.status_code, detail, model, message)
        if isinstance(cause, httpx.TimeoutException):
            return message(
                f"NDIF at {host} did not answer the request for {model} within {timeout:g} s. " + retry_timeout
            )
        if isinstance(cause, httpx.ConnectError):
            return message(
                f"Could not reach NDIF at {host} ({detail}). Check your network connection, and NDIF_HOST if you "
                f"set it; {STATUS_URL} shows whether NDIF is up."
            )
        if "API key" in detail:
            return _http_status_message(401, detail, model, message)
        return message(f"The connection to NDIF at {host} dropped while {backend.phase} ({detail}). " + dropped)
    if isinstance(error, NnsightRemoteError):
        lowered = text.lower()
        if (
            "not dedicated" in lowered
            or "hotswapping" in lowered
            or "not deployed" in lowered
            or "not running" in lowered
        ):
            return message(
                f"NDIF is not serving {model} right now{job_text}: {text.strip()} Pick a model NDIF runs "
                f'(list: {STATUS_URL}, or python -c "import nnsight; print(nnsight.status())") and set it as '
                "model.id, or try again when it is deployed."
            )
        return message(_server_error_text(text, model, job_text))
    if isinstance(error, httpx.HTTPStatusError):
        detail = error.response.text[:300] if error.response is not None else str(error)
        return _http_status_message(error.response.status_code, detail, model, message)
    if isinstance(error, httpx.TimeoutException):
        return message(
            f"NDIF at {host} stopped answering while {backend.phase} for {model}{job_text}. " + retry_timeout
        )
    connection_errors: tuple[type, ...] = (httpx.TransportError, ConnectionError, OSError)
    if websocket is not None:
        connection_errors += (websocket.WebSocketException,)
    if isinstance(error, connection_errors):
        return message(
            f"The connection to NDIF at {host} dropped while {backend.phase} for {model}{job_text} "
            f"({type(error).__name__}: {error}). " + dropped
        )
    return message(
        f"The NDIF request for {model}{job_text} failed while {backend.phase}: {type(error).__name__}: {error}. "
        'If this repeats, check that nnsight is at the version NDIF expects (python -c "import nnsight; '
        'nnsight.compare()").'
    )


def _http_status_message(status: int, detail: str, model: str, message: Callable[[str], RemoteError]) -> RemoteError:
    if status in (401, 403) or "api key" in detail.lower():
        return message(
            f"NDIF refused the API key (HTTP {status}: {detail.strip()}). Check the key in NDIF_API_KEY (or the one "
            "saved with nnsight.CONFIG.set_default_api_key): copy it again from " + KEY_URL + ", or create a new one "
            "there if it was revoked."
        )
    if status == 404:
        return message(
            f"NDIF does not know the request or model {model} (HTTP 404: {detail.strip()}). See {STATUS_URL}."
        )
    if status >= 500:
        return message(
            f"NDIF could not take the request for {model} (HTTP {status}: {detail.strip()}). The service may be down "
            f"or restarting: check {STATUS_URL} and try again later."
        )
    return message(
        f"NDIF refused the request for {model} (HTTP {status}: {detail.strip()}). Check that nnsight is at the "
        'version NDIF expects (python -c "import nnsight; nnsight.compare()").'
    )


def _server_error_text(text: str, model: str, job_text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no detail"
    lowered = text.lower()
    if "out of memory" in lowered or "outofmemory" in lowered:
        hint = (
            "The request needed more GPU memory than NDIF gives it: "
            "lower extraction.batch_size or generation.batch_size."
        )
    elif "deadline" in lowered or "timed out" in lowered or "timeout" in lowered:
        hint = "The job ran past NDIF's own time limit: send smaller requests (fewer prompts, lower batch sizes)."
    elif "whitelisted" in lowered or "no module named" in lowered:
        hint = (
            "The server refused code it may not run; "
            "report this as an nsteer bug (the request should hold only torch code)."
        )
    else:
        hint = (
            "Check that the recipe fits the model (layers exist, layers_path is right); if it does, retry later or "
            f"report it with the job id. Status: {STATUS_URL}"
        )
    return f"NDIF reported an error while running the request for {model}{job_text}: {last} {hint}"
