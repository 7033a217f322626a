"""NDIF jobs: submit extraction or generation without waiting, and collect the results later.

:func:`submit_vector` / :func:`submit_recipe_vectors` / :func:`submit_generation` run the very functions a blocking
run uses, on a copy of the handle whose execution only posts the request (``Execution.submitting()``), and record
what is needed to finish each job in a small JSON file (:func:`jobs_dir`; never the API key). :func:`collect` polls a
job and, once it finished, writes its results exactly as the blocking run would (vector files), or returns the
answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

from nsteer.edits import Edit
from nsteer.errors import NsteerError, RemoteError
from nsteer.execution.errors import DeadlinePassed, safe_cause, translate_error
from nsteer.execution.ndif import NdifBackend, Submitted, ndif_host, require_api_key
from nsteer.execution.results import expect_list, expect_tensor
from nsteer.extract import MeanDifference, direction_statistics, mean_difference, vector_metadata
from nsteer.fileio import MAX_DATA_BYTES, atomic_write_bytes, expand_user, parse_json, path_kind, read_text
from nsteer.generate import (
    GenerationConfig,
    edits_per_row,
    eos_ids,
    generation_batches,
    prompt_list,
    steered_generate_batches,
    store_new_tokens,
)
from nsteer.models import ModelHandle
from nsteer.pipeline import vector_tasks
from nsteer.prompts import Instruction, PromptPair
from nsteer.recipe import Recipe
from nsteer.vectors import SteeringVector, VectorMetadata, load_vector, replace_vector


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_batch(item: Any, n_prompts: int) -> bool:
    """A generation batch of a job record: its rows (prompt indexes) and the width of its left-padded prompts."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("rows"), list)
        and bool(item["rows"])
        and all(_is_int(row) and 0 <= row < n_prompts for row in item["rows"])
        and _is_int(item.get("width"))
        and item["width"] > 0
    )


def jobs_dir() -> Path:
    """Where job records live: ``$NSTEER_JOBS_DIR``, else ``$XDG_STATE_HOME/nsteer/jobs`` (``~/.local/state/...``)."""
    explicit = os.environ.get("NSTEER_JOBS_DIR")
    if explicit:
        return expand_user(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return expand_user(state) / "nsteer" / "jobs"


def _job_file(job_id: str, *, done: bool = False) -> Path:
    safe = "".join(ch for ch in job_id if ch.isalnum() or ch in "-_.")
    if not safe or safe != job_id:
        raise RemoteError(f"'{job_id}' is not an NDIF job id (letters, digits, - and _ only).")
    return jobs_dir() / ("done" if done else "") / f"{safe}.json"


def _write_job(job: RemoteJob, *, done: bool = False) -> Path:
    path = _job_file(job.id, done=done)
    atomic_write_bytes(path, job.to_json().encode())
    return path


def load_job(job_id: str) -> RemoteJob:
    """The record of a job submitted from this machine (pending or already collected), every field checked."""
    for done in (False, True):
        path = _job_file(job_id, done=done)
        if path_kind(path) != "nothing":
            return _read_job(path, job_id)
    raise RemoteError(
        f"No record of job {job_id} in {jobs_dir()}. Jobs are collected on the machine (and with the "
        "NSTEER_JOBS_DIR) they were submitted from; `nsteer collect --all` lists and collects the pending ones."
    )


def pending_job_ids() -> list[str]:
    """The ids of every job record not collected yet, oldest first: a record that cannot be read is still listed
    (last), so collecting it reports what is wrong with it instead of hiding it or stopping the others."""
    directory = jobs_dir()
    if not directory.is_dir():
        return []
    found: list[tuple[float, str]] = []
    for path in directory.glob("*.json"):
        try:
            found.append((_read_job(path, path.stem).created, path.stem))
        except NsteerError:
            found.append((float("inf"), path.stem))
    return [job_id for _, job_id in sorted(found)]


def pending_jobs() -> list[RemoteJob]:
    """Jobs submitted from here and not collected yet, oldest first (records that cannot be read are left out:
    :func:`pending_job_ids` lists them too)."""
    jobs = []
    for job_id in pending_job_ids():
        try:
            jobs.append(load_job(job_id))
        except NsteerError:
            continue
    return jobs


# Each field of a job record and what it must be; records are data, written by nsteer but read back from disk.
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "kind": (str,),
    "model_id": (str,),
    "model_key": (str,),
    "host": (str,),
    "revision": (str, type(None)),
    "created": (int, float),
    "payload": (dict,),
}
JOB_KINDS = ("vector", "generation")


def _read_job(path: Path, job_id: str) -> RemoteJob:
    """The job record at ``path``, or a RemoteError naming the record and what is wrong with it."""
    text = read_text(path, "job record", RemoteError, limit=MAX_DATA_BYTES)
    damaged = f"The job record {path} is damaged"
    remedy = "delete it and submit the job again."
    try:
        data = parse_json(text)
    except ValueError as error:
        raise RemoteError(f"{damaged} (not valid JSON: {error.msg}); {remedy}") from None
    if not isinstance(data, dict):
        raise RemoteError(f"{damaged} (it is not a JSON object); {remedy}")
    missing = sorted(set(_RECORD_FIELDS) - {"revision"} - set(data))
    unknown = sorted(set(data) - set(_RECORD_FIELDS))
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown[:5])}"
        raise RemoteError(f"{damaged} or was not written by this nsteer (it {problem}); {remedy}")
    for name, kinds in _RECORD_FIELDS.items():
        value = data.get(name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise RemoteError(f"{damaged}: its field {name} is {_shown(value)}; {remedy}")
    if data["id"] != job_id:
        raise RemoteError(f"{damaged}: it is named {job_id} but holds job {_shown(data['id'])}; {remedy}")
    if data["kind"] not in JOB_KINDS:
        raise RemoteError(
            f"Job {job_id} has an unknown kind {_shown(data['kind'])} in its record; it was not made by this nsteer."
        )
    if not data["host"].startswith(("https://", "http://")):
        raise RemoteError(f"{damaged}: its host {_shown(data['host'])} is not an http(s) url; {remedy}")
    return RemoteJob(**data)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _submit(handle: ModelHandle, run: Callable[[ModelHandle], Any]) -> str:
    """Run ``run`` on a copy of ``handle`` that posts its one NDIF request and stops; the job id."""
    submitting = dataclasses.replace(handle, execution=handle.execution.submitting())
    try:
        run(submitting)
    except Submitted as submitted:
        return submitted.job_id
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
    instruction: Instruction,
    pairs: Sequence[PromptPair],
    *,
    path: str | Path,
    batch_size: int = 16,
    seed: int = 0,
    keep_choice: bool = True,
) -> RemoteJob:
    """Submit the extraction for ``instruction``'s vector as one NDIF job; ``collect`` writes it to ``path``.

    ``keep_choice``: when ``path`` already holds a searched vector for this instruction, carry its choice over.
    """
    if not pairs:
        raise NsteerError(f"No training pairs for '{instruction.id}': the train split is empty. Add base prompts.")
    metadata = vector_metadata(handle, instruction, pairs, seed=seed)
    job_id = _submit(handle, lambda submitting: mean_difference(submitting, pairs, batch_size=batch_size))
    return _new_job(
        handle,
        job_id,
        "vector",
        {
            "path": str(expand_user(path).resolve()),
            "n_pairs": len(pairs),
            "metadata": metadata.to_json(),
            "keep_choice": keep_choice,
        },
    )


def submit_recipe_vectors(recipe: Recipe, handle: ModelHandle, *, force: bool = False) -> dict[str, RemoteJob | Path]:
    """Submit one job per instruction whose vector `compute` would make (the same :func:`nsteer.pipeline.vector_tasks`);
    files it would keep are returned as paths."""
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
    edits: Sequence[Edit] = (),
    *,
    row_edits: Sequence[Sequence[Edit]] | None = None,
    config: GenerationConfig | None = None,
    chat: bool = True,
) -> RemoteJob:
    """Submit steered generation for ``prompts`` as one NDIF job; ``collect`` returns the answers."""
    config = config or GenerationConfig()
    prompts = prompt_list(prompts)
    row_edits = edits_per_row(prompts, edits, row_edits)
    if not prompts:
        raise NsteerError("No prompt to generate for.")
    batches = generation_batches(
        handle,
        prompts,
        row_edits,
        batch_size=config.batch_size,
        chat=chat,
        max_new_tokens=config.max_new_tokens,
        truncate=config.truncate_prompts,
    )
    generate_kwargs = config.generate_kwargs(handle.tokenizer.pad_token_id)
    job_id = _submit(
        handle,
        lambda submitting: steered_generate_batches(
            submitting, [(batch.input_ids, batch.attention_mask, batch.plan) for batch in batches], generate_kwargs
        ),
    )
    return _new_job(
        handle,
        job_id,
        "generation",
        {
            "prompts": list(prompts),
            "batches": [{"rows": list(batch.rows), "width": int(batch.input_ids.shape[1])} for batch in batches],
            "eos": sorted(eos_ids(handle)),
        },
    )


def collect(job_id: str, *, wait: float = 0.0) -> CollectedJob:
    """Fetch job ``job_id``; once finished, write its vector file (or decode its answers) as a blocking run would.

    ``wait`` seconds: keep polling that long for a job still running. A finished job's record moves to ``done/``.
    """
    job = load_job(job_id)
    key = require_api_key()
    configured = ndif_host()
    if job.host.rstrip("/") != configured.rstrip("/"):
        # The record names the host to ask (and to send the API key to): only the one nsteer is configured for.
        raise RemoteError(
            f"Job {job.id} was submitted to {job.host}, but requests now go to {configured} (NDIF_HOST, "
            "nnsight.CONFIG.API.HOST). The API key is sent only to the configured host, so the job was not fetched: "
            f"if {job.host} is NDIF and you sent the job there, collect it with NDIF_HOST={job.host}; otherwise "
            "submit it again."
        )
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
    except DeadlinePassed:
        status = backend.status.value if backend.status is not None else None
        return CollectedJob(job, done=False, status=status or "no status yet: queued, or unknown to NDIF (expired)")
    except RemoteError:  # nsteer's own verdict on what came back: the job stays pending
        raise
    except Exception as error:
        translated = translate_error(error, backend=backend)
        if isinstance(error, NnsightRemoteError):  # the job itself failed: it will not finish, stop listing it
            _write_job(job, done=True)
            _job_file(job.id).unlink(missing_ok=True)
            translated = RemoteError(f"{translated} The job is finished with an error: submit it again.")
        raise translated from safe_cause(error, key)
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


def _payload(job: RemoteJob, name: str, kinds: type | tuple[type, ...], check: Callable[[Any], bool] = bool) -> Any:
    """Field ``name`` of the job's payload, of type ``kinds`` and passing ``check``; else a RemoteError."""
    value = job.payload.get(name)
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool) or not check(value):
        raise RemoteError(
            f"The record of job {job.id} is damaged: its payload field {name} is {_shown(value)}. "
            "Delete the record and submit the job again."
        )
    return value


def _finish_vector(job: RemoteJob, result: Mapping[str, Any]) -> CollectedJob:
    path = Path(_payload(job, "path", str, lambda text: Path(text).is_absolute() and text.endswith(".safetensors")))
    count = _payload(job, "n_pairs", int, lambda number: number > 0)
    keep = _payload(job, "keep_choice", bool, lambda flag: True)
    metadata = VectorMetadata.from_json(_payload(job, "metadata", str), path)
    if path_kind(path) != "nothing":  # never replace what is not a vector file (the record names the path)
        try:
            load_vector(path)
        except NsteerError as error:
            raise RemoteError(
                f"Job {job.id} finished, but {path} holds something other than a readable vector ({error}); "
                "nsteer does not replace it. Move it away and collect again."
            ) from None
    sums = expect_tensor(
        result.get("sums"), "sums", dtype=torch.float64, shape=(2, metadata.n_layers, metadata.hidden_size)
    )
    statistics = MeanDifference(sums[0] / count, sums[1] / count, count)
    directions, mean_projections, norms = direction_statistics(statistics)  # refuses zero or non-finite layers
    vector = SteeringVector(directions, mean_projections, norms, metadata)
    replace_vector(path, vector, keep_choices=keep)  # as `nsteer compute` does
    return CollectedJob(job, done=True, status="COMPLETED", paths={metadata.instruction_id: path})


def _finish_generation(job: RemoteJob, result: Mapping[str, Any]) -> CollectedJob:
    from transformers import AutoTokenizer

    prompts = _payload(job, "prompts", list, lambda items: bool(items) and all(isinstance(p, str) for p in items))
    eos = set(_payload(job, "eos", list, lambda items: all(_is_int(token) for token in items)))
    batches = _payload(job, "batches", list, lambda items: all(_is_batch(item, len(prompts)) for item in items))
    outputs = expect_list(result.get("outputs"), "outputs", len(batches))
    tokens: list[list[int]] = [[] for _ in prompts]
    for batch, output in zip(batches, outputs):
        output = expect_tensor(
            output, "outputs", dtype=torch.long, shape=(len(batch["rows"]), None), value_range=(0, 1 << 31)
        )
        if output.shape[1] < batch["width"]:
            raise RemoteError(f"The result 'outputs' of job {job.id} is shorter than its prompts; nothing was used.")
        store_new_tokens(tokens, batch["rows"], batch["width"], output, eos)
    try:
        tokenizer = AutoTokenizer.from_pretrained(job.model_id, **({"revision": job.revision} if job.revision else {}))
    except Exception as error:
        raise RemoteError(
            f"Job {job.id} finished, but the tokenizer of {job.model_id} could not be loaded to decode it ({error})."
        ) from None
    vocabulary = len(tokenizer)
    if any(token >= vocabulary for ids in tokens for token in ids):
        raise RemoteError(
            f"The result of job {job.id} holds token ids beyond the {vocabulary} of {job.model_id}'s tokenizer: "
            "it is not this model's output; nothing was used."
        )
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
    return CollectedJob(job, done=True, status="COMPLETED", answers=answers, tokens=tokens)
