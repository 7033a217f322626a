"""Run nsteer's own trace functions on NDIF: the remote model handle, the request backend, errors, non-blocking jobs.

Nothing here changes what a trace does. ``extract.last_token_sums`` and ``generate.steered_generate_batches`` are the
same functions locally and remotely; a remote handle only makes ``extract.handle_trace_kwargs`` hand their
``model.session(...)`` an :class:`NdifBackend`. The trace bodies reference tensors, numbers and the model's modules
only, so nothing of nsteer has to exist on the server (the mock NDIF server in the tests runs them in a process
where ``import nsteer`` fails).

The backend submits each session over HTTP and polls for its result (nnsight's non-blocking protocol), which gives
every request nsteer's own deadline (the blocking websocket client has none), then hands the saved values back to
the calling frame exactly as the blocking client would. Every failure becomes a :class:`nsteer.errors.RemoteError`
whose message says what to do. The API key goes only into the request headers: it is never printed, logged,
written to a file, or put into an exception message.

Non-blocking use: :func:`submit_vector` / :func:`submit_recipe_vectors` / :func:`submit_generation` return job ids
and record what is needed to finish each job in a small JSON file (``jobs_dir()``); :func:`collect` fetches a
finished job and writes its results exactly as the blocking run would (vector files), or returns the answers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

from nsteer.errors import ModelError, NsteerError, RemoteError
from nsteer.models import ModelHandle, make_handle

_log = logging.getLogger(__name__)

#: Seconds nsteer waits for one NDIF request (submission, queue, run and download) before giving up.
#: Recipes set it with ``model.timeout``; the SDK with ``open_model(..., timeout=...)``.
DEFAULT_TIMEOUT = 900.0

#: How many batches travel in one request: all extraction batches of an instruction up to this count share one
#: nnsight session (only per-layer sums come back), generation batches likewise.
BATCHES_PER_REQUEST = {"extraction": 64, "generation": 16}

KEY_URL = "https://login.ndif.us/"
STATUS_URL = "https://nnsight.net/status/"

_MISSING_KEY = (
    "No NDIF API key found. Create one at " + KEY_URL + ", then either export it as NDIF_API_KEY in the shell "
    "that runs nsteer, or save it once with: "
    "python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('YOUR_KEY')\"."
)

# Set while submit_* runs the shared functions: the backend posts the request and stops there.
_SUBMIT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("nsteer_submit_only", default=False)

# Poll interval for a running job: starts short (a small job is back in well under a second), grows to the cap.
_POLL_FIRST_S = 0.05
_POLL_GROWTH = 1.3
_POLL_MAX_S = 2.0


# --------------------------------------------------------------------------------------------------------- key


def api_key() -> str | None:
    """The NDIF API key nnsight will send: ``nnsight.CONFIG`` (config file, ``NDIF_API_KEY`` at import) or the env."""
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or None


def require_api_key() -> str:
    """The API key, or a RemoteError saying how to get one (checked before anything is sent)."""
    key = api_key()
    if not key:
        raise RemoteError(_MISSING_KEY)
    return key


def ndif_host() -> str:
    """The NDIF API host requests go to (``nnsight.CONFIG.API.HOST``; ``NDIF_HOST`` sets it at nnsight import)."""
    from nnsight import CONFIG

    return CONFIG.API.HOST


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "<api key>") if key and len(key) >= 4 else text


# ------------------------------------------------------------------------------------------------------- model


def open_remote_model(
    hub_id: str,
    *,
    layers_path: str | None = None,
    revision: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ModelHandle:
    """A handle on the NDIF-hosted model ``hub_id``: a weightless (meta) copy built from its Hub config and tokenizer.

    Only the config and tokenizer are downloaded here; the weights stay on NDIF. ``timeout`` bounds each request.
    """
    if hub_id.startswith("embedded:") or hub_id.endswith(".gguf") or Path(hub_id).expanduser().exists():
        raise RemoteError(
            f"'{hub_id}' is a local model; NDIF runs models named by their Hugging Face Hub id "
            "(e.g. meta-llama/Llama-3.1-8B-Instruct). Use backend: local for it, or give a Hub id NDIF serves."
        )
    if timeout <= 0:
        raise RemoteError(f"The NDIF timeout must be a positive number of seconds, got {timeout!r}.")
    require_api_key()
    from nnsight import TransformersModel

    # task= avoids asking the Hub for the pipeline tag; tokenizer= is required by nnsight 0.8.1 with transformers 5
    # (else the meta pipeline cannot guess a tokenizer). Only strings go into the wrapper: its kwargs travel with
    # every request.
    kwargs: dict[str, Any] = {"task": "text-generation", "tokenizer": hub_id}
    if revision:
        kwargs["revision"] = revision
    try:
        model = TransformersModel(hub_id, **kwargs)
    except Exception as error:  # OSError, HTTP errors, ValueError from transformers: all mean "cannot build it"
        raise RemoteError(
            f"Could not read the config and tokenizer of '{hub_id}' from the Hugging Face Hub "
            f"({type(error).__name__}: {' '.join(str(error).split())}) "
            "Check the id and revision; gated models (Llama, Gemma) need an "
            "accepted license and `huggingface-cli login`. See " + STATUS_URL + " for the models NDIF serves."
        ) from None
    try:
        return make_handle(
            model,
            model._module,
            model.tokenizer,
            model_id=hub_id,
            layers_path=layers_path,
            remote_timeout=float(timeout),
        )
    except ModelError as error:
        raise RemoteError(str(error)) from None


def trace_kwargs(handle: ModelHandle) -> dict[str, Any]:
    """What ``model.trace``/``generate``/``session`` need to run ``handle``'s work on NDIF with nsteer's deadline."""
    key = require_api_key()
    try:
        backend = NdifBackend(
            handle.model,
            model_id=handle.model_id,
            timeout=handle.remote_timeout or DEFAULT_TIMEOUT,
            api_key=key,
            submit_only=_SUBMIT_ONLY.get(),
        )
    except ValueError as error:  # nnsight refuses a host that is not an http(s) url
        raise RemoteError(
            f"{error}. Set NDIF_HOST (or nnsight.CONFIG.API.HOST) to NDIF's url, e.g. https://api.ndif.us."
        ) from None
    return {"backend": backend}


def batches_per_request(kind: str) -> int:
    """Batches per NDIF request for ``kind`` (extraction or generation); unlimited while submitting a job."""
    if _SUBMIT_ONLY.get():
        return 1 << 30  # a non-blocking job is one request
    return BATCHES_PER_REQUEST[kind]


# ----------------------------------------------------------------------------------------------------- backend


class _Deadline(TimeoutError):
    """nsteer's own deadline for one request passed."""


class _Submitted(Exception):
    """Control flow of submit_*: the request is posted; nothing comes back in this process."""

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
    (or ``timeout`` seconds passed), and pushes them into the caller's frame like the blocking client. The backend
    itself never travels with the request (nnsight drops it from the pickled tracer).
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
            env=model._remoteable_get_env() if model is not None else {},
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
            with _http_read_timeout(deadline):
                self.submit(tracer)
            _log.info("NDIF job %s submitted for %s", self.job_id, self.model_id)
            if self.submit_only:
                raise _Submitted(self.job_id)
            result = self.wait(deadline)
        except _Submitted:
            raise
        except Exception as error:
            raise translate_error(error, backend=self) from _safe_cause(error, self.api_key)
        self._push(result, tracer)
        return result

    def wait(self, deadline: float) -> dict:
        """Poll the submitted job until its saved values are back; ``_Deadline`` past ``deadline``."""
        interval = _POLL_FIRST_S
        while True:
            self.phase = "waiting for the result"
            with _http_read_timeout(deadline):
                result = self.poll()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise _Deadline(self.job_id)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * _POLL_GROWTH, _POLL_MAX_S)

    def download_result(self, url: Any) -> Any:
        self.phase = "downloading the result"
        return super().download_result(url)


@contextlib.contextmanager
def _http_read_timeout(deadline: float) -> Iterator[None]:
    """Bound nnsight's HTTP read timeout (a module global, 600 s) by what is left of the deadline."""
    import nnsight.intervention.backends.remote as remote_module

    original = remote_module._READ_TIMEOUT
    remote_module._READ_TIMEOUT = max(0.5, min(original, deadline - time.monotonic()))
    try:
        yield
    finally:
        remote_module._READ_TIMEOUT = original


def _safe_cause(error: BaseException, key: str | None) -> BaseException | None:
    """The original exception as the cause, unless its text holds the key (then none)."""
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if key and key in str(chain):
            return None
        chain = chain.__cause__ or chain.__context__
    return error


# ------------------------------------------------------------------------------------------------------ errors


def translate_error(error: BaseException, *, backend: NdifBackend) -> RemoteError:
    """Turn whatever the nnsight client raised into a RemoteError that says what happened and what to do."""
    import httpx

    try:
        import websocket
    except ImportError:  # pragma: no cover - websocket-client ships with nnsight
        websocket = None
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
        return RemoteError(_scrub(text, backend.api_key))

    if isinstance(error, _Deadline):
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


# ---------------------------------------------------------------------------------------------- non-blocking


@dataclass(frozen=True)
class RemoteJob:
    """A submitted NDIF job and what nsteer needs to finish it locally (no credentials)."""

    id: str
    kind: str  # "vector" or "generation"
    model_id: str
    model_key: str
    host: str
    revision: str | None = None
    created: float = 0.0
    payload: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The job record as JSON."""
        return json.dumps(
            {
                "id": self.id,
                "kind": self.kind,
                "model_id": self.model_id,
                "model_key": self.model_key,
                "host": self.host,
                "revision": self.revision,
                "created": self.created,
                "payload": dict(self.payload),
            },
            indent=1,
            sort_keys=True,
        )


@dataclass(frozen=True)
class CollectedJob:
    """What ``collect`` found: still running, or finished with vector files written or answers decoded."""

    job: RemoteJob
    done: bool
    status: str | None = None
    paths: Mapping[str, Path] = field(default_factory=dict)  # vector jobs: instruction -> file written
    answers: list[str] | None = None  # generation jobs
    tokens: list[list[int]] | None = None


def jobs_dir() -> Path:
    """Where job records live: ``$NSTEER_JOBS_DIR``, else ``$XDG_STATE_HOME/nsteer/jobs`` (``~/.local/state/...``)."""
    explicit = os.environ.get("NSTEER_JOBS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "nsteer" / "jobs"


def _job_file(job_id: str, *, done: bool = False) -> Path:
    safe = "".join(ch for ch in job_id if ch.isalnum() or ch in "-_.")
    if not safe or safe != job_id:
        raise RemoteError(f"'{job_id}' is not an NDIF job id (letters, digits, - and _ only).")
    return jobs_dir() / ("done" if done else "") / f"{safe}.json"


def _write_job(job: RemoteJob, *, done: bool = False) -> Path:
    from nsteer.fileio import atomic_write_bytes

    path = _job_file(job.id, done=done)
    atomic_write_bytes(path, job.to_json().encode())
    return path


def load_job(job_id: str) -> RemoteJob:
    """The record of a job submitted from this machine (pending or already collected)."""
    for done in (False, True):
        path = _job_file(job_id, done=done)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return RemoteJob(**data)
    raise RemoteError(
        f"No record of job {job_id} in {jobs_dir()}. Jobs are collected on the machine (and with the "
        "NSTEER_JOBS_DIR) they were submitted from; `nsteer collect --all` lists and collects the pending ones."
    )


def pending_jobs() -> list[RemoteJob]:
    """Jobs submitted from here and not collected yet, oldest first."""
    directory = jobs_dir()
    if not directory.is_dir():
        return []
    jobs = [RemoteJob(**json.loads(path.read_text(encoding="utf-8"))) for path in directory.glob("*.json")]
    return sorted(jobs, key=lambda job: job.created)


def _submit(handle: ModelHandle, run: Callable[[], Any]) -> str:
    if not handle.remote:
        raise NsteerError("Only models opened with remote=True (backend: ndif) can be submitted as NDIF jobs.")
    token = _SUBMIT_ONLY.set(True)
    try:
        run()
    except _Submitted as submitted:
        return submitted.job_id
    finally:
        _SUBMIT_ONLY.reset(token)
    raise RemoteError("Nothing was sent to NDIF (no request was made); report this as an nsteer bug.")


def _new_job(handle: ModelHandle, job_id: str, kind: str, payload: Mapping[str, Any]) -> RemoteJob:
    job = RemoteJob(
        id=job_id,
        kind=kind,
        model_id=handle.model_id,
        model_key=handle.model.to_model_key(),
        host=ndif_host(),
        revision=_revision(handle),
        created=time.time(),
        payload=dict(payload),
    )
    _write_job(job)
    return job


def _revision(handle: ModelHandle) -> str | None:
    key = handle.model.to_model_key()
    try:
        revision = json.loads(key.split(":", 1)[1]).get("revision")
    except (IndexError, ValueError, AttributeError):
        return None
    return revision if isinstance(revision, str) else None


def submit_vector(
    handle: ModelHandle,
    instruction: Any,
    pairs: Sequence[Any],
    *,
    path: str | Path,
    batch_size: int = 16,
    seed: int = 0,
    keep_choice: bool = True,
) -> RemoteJob:
    """Submit the extraction for ``instruction``'s vector as one NDIF job; ``collect`` writes it to ``path``.

    ``keep_choice``: when ``path`` already holds a searched vector for this instruction, carry its choice over.
    """
    from nsteer.extract import mean_difference, vector_metadata

    if not pairs:
        raise NsteerError(f"No training pairs for '{instruction.id}': the train split is empty. Add base prompts.")
    metadata = vector_metadata(handle, instruction, pairs, seed=seed)
    job_id = _submit(handle, lambda: mean_difference(handle, pairs, batch_size=batch_size))
    return _new_job(
        handle,
        job_id,
        "vector",
        {
            "path": str(Path(path).expanduser().resolve()),
            "n_pairs": len(pairs),
            "metadata": metadata.to_json(),
            "keep_choice": keep_choice,
        },
    )


def submit_recipe_vectors(recipe: Any, handle: ModelHandle, *, force: bool = False) -> dict[str, RemoteJob | Path]:
    """Submit one job per instruction whose vector `compute` would make (the same :func:`nsteer.workflow.vector_tasks`);
    files it would keep are returned as paths."""
    from nsteer.workflow import vector_tasks

    return {
        task.name: task.path
        if task.keep
        else submit_vector(
            handle,
            task.instruction,
            task.pairs,
            path=task.path,
            batch_size=recipe.extraction.batch_size,
            seed=recipe.prompts.seed,
            keep_choice=not force,
        )
        for task in vector_tasks(recipe, handle, force=force)
    }


def submit_generation(
    handle: ModelHandle,
    prompts: Sequence[str],
    edits: Sequence[Any] = (),
    *,
    row_edits: Sequence[Sequence[Any]] | None = None,
    config: Any = None,
    chat: bool = True,
) -> RemoteJob:
    """Submit steered generation for ``prompts`` as one NDIF job; ``collect`` returns the answers."""
    from nsteer.generate import GenerationConfig, _eos_ids, generation_batches, steered_generate_batches

    config = config or GenerationConfig()
    if row_edits is None:
        row_edits = [list(edits)] * len(prompts)
    elif len(row_edits) != len(prompts):
        raise ValueError(f"row_edits has {len(row_edits)} entries for {len(prompts)} prompts")
    if not prompts:
        raise NsteerError("No prompt to generate for.")
    batches = generation_batches(handle, prompts, row_edits, batch_size=config.batch_size, chat=chat)
    generate_kwargs = config.generate_kwargs(handle.tokenizer.pad_token_id)
    job_id = _submit(
        handle,
        lambda: steered_generate_batches(
            handle, [(batch.input_ids, batch.attention_mask, batch.plan) for batch in batches], generate_kwargs
        ),
    )
    return _new_job(
        handle,
        job_id,
        "generation",
        {
            "prompts": list(prompts),
            "batches": [{"rows": list(batch.rows), "width": int(batch.input_ids.shape[1])} for batch in batches],
            "eos": sorted(_eos_ids(handle)),
        },
    )


def collect(job_id: str, *, wait: float = 0.0) -> CollectedJob:
    """Fetch job ``job_id``; once finished, write its vector file (or decode its answers) as a blocking run would.

    ``wait`` seconds: keep polling that long for a job still running. A finished job's record moves to ``done/``.
    """
    job = load_job(job_id)
    key = require_api_key()
    backend = NdifBackend(
        None,
        model_id=job.model_id,
        timeout=max(wait, 0.0),
        api_key=key,
        job_id=job.id,
        model_key=job.model_key,
        host=job.host,
    )
    deadline = time.monotonic() + max(wait, 0.0)
    try:
        result = backend.wait(deadline)
    except _Deadline:
        status = backend.status.value if backend.status is not None else None
        return CollectedJob(job, done=False, status=status or "no status yet: queued, or unknown to NDIF (expired)")
    except Exception as error:
        translated = translate_error(error, backend=backend)
        if isinstance(error, NnsightRemoteError):  # the job itself failed: it will not finish, stop listing it
            _write_job(job, done=True)
            _job_file(job.id).unlink(missing_ok=True)
            translated = RemoteError(f"{translated} The job is finished with an error: submit it again.")
        raise translated from _safe_cause(error, key)
    collected = _finish(job, result)
    _write_job(job, done=True)
    _job_file(job.id).unlink(missing_ok=True)
    return collected


def _finish(job: RemoteJob, result: Mapping[str, Any]) -> CollectedJob:
    if job.kind == "vector":
        return _finish_vector(job, result)
    if job.kind == "generation":
        return _finish_generation(job, result)
    raise RemoteError(f"Job {job.id} has an unknown kind '{job.kind}' in its record; it was not made by this nsteer.")


def _finish_vector(job: RemoteJob, result: Mapping[str, Any]) -> CollectedJob:
    from nsteer.extract import MeanDifference, direction_statistics
    from nsteer.vectors import SteeringVector, VectorMetadata, carry_choices, save_vector

    payload = job.payload
    path = Path(payload["path"])
    sums = result["sums"].to(torch.float64)
    count = int(payload["n_pairs"])
    statistics = MeanDifference(sums[0] / count, sums[1] / count, count)
    directions, mean_projections, norms = direction_statistics(statistics)
    metadata = VectorMetadata.from_json(payload["metadata"], path)
    vector = SteeringVector(directions, mean_projections, norms, metadata)
    if payload.get("keep_choice", True) and path.exists():  # keep the searched settings, as `nsteer compute` does
        vector = carry_choices(path, vector)
    save_vector(vector, path)
    return CollectedJob(job, done=True, status="COMPLETED", paths={metadata.instruction_id: path})


def _finish_generation(job: RemoteJob, result: Mapping[str, Any]) -> CollectedJob:
    from transformers import AutoTokenizer

    from nsteer.generate import store_new_tokens

    payload = job.payload
    prompts = payload["prompts"]
    eos = set(payload["eos"])
    tokens: list[list[int]] = [[] for _ in prompts]
    for batch, output in zip(payload["batches"], result["outputs"]):
        store_new_tokens(tokens, batch["rows"], batch["width"], output, eos)
    try:
        tokenizer = AutoTokenizer.from_pretrained(job.model_id, **({"revision": job.revision} if job.revision else {}))
    except Exception as error:
        raise RemoteError(
            f"Job {job.id} finished, but the tokenizer of {job.model_id} could not be loaded to decode it ({error})."
        ) from None
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
    return CollectedJob(job, done=True, status="COMPLETED", answers=answers, tokens=tokens)
