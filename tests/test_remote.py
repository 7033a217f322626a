"""nsteer on NDIF, proven against the loopback mock NDIF server (tests/mock_ndif).

The mock runs every request in a separate process where ``import nsteer`` fails, so a vector or a token sequence
that comes back as the local run's proves the trace bodies need no nsteer code on the server. That process may run
another thread count, so floats agree to a stated tolerance, not bit for bit; greedy token ids are compared exactly: a
last-bit difference (~1e-5 here) changes a token only where the two best logits nearly tie, and on these prompts the
chosen token leads the next by 1.3e-2 or more (measured on the unsteered runs of the tiny llama). Each failure
the mock can produce is checked for the message nsteer turns it into, and the API key is checked never to leak.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nsteer.jobs as jobs
from nsteer.edits import Edit, compile_plan
from nsteer.errors import RemoteError
from nsteer.execution.backend import Execution
from nsteer.execution.errors import translate_error
from nsteer.execution.ndif import NdifBackend
from nsteer.extract import chat_token_ids, compute_vector, last_token_sums, left_pad
from nsteer.generate import GenerationConfig, generate, generate_tokens, steered_generate_batches
from nsteer.models import open_model, wrap_model
from nsteer.pipeline import compute_recipe_vectors, open_recipe_model
from nsteer.prompts import BasePrompt, Instruction, make_pairs
from nsteer.recipe import recipe_from_dict
from nsteer.vectors import load_vector

try:
    from mock_ndif.tiny_models import DEFAULT_MODEL, UNDEPLOYED_MODEL
except ImportError:  # the repository root on sys.path instead of tests/
    from tests.mock_ndif.tiny_models import DEFAULT_MODEL, UNDEPLOYED_MODEL

SECRET = "ndif-secret-7f3a9c1e5b2d4068"  # an API key distinctive enough to search every output for

INSTRUCTION = Instruction(
    id="shout",
    category="format",
    description="answer in capitals",
    check_id="change_case:english_capital",
    phrasings=("Answer in capital letters only.", "WRITE EVERYTHING IN CAPITALS.", "Use only uppercase letters."),
)
BASES = [
    BasePrompt(f"b{i}", text)
    for i, text in enumerate(
        [
            "Why is the sky blue?",
            "Name three fruits.",
            "How do magnets work?",
            "What is rain?",
            "Describe a cat in one line.",
            "Why do we sleep?",
            "What is a prime number?",
        ]
    )
]
PROMPTS = ["Tell me about the sea.", "Hi!", "What is two plus two?", "List two colours.", "Say something kind."]

_LOCAL: dict[str, object] = {}


def remote_handle(timeout: float = 30.0, model_id: str = DEFAULT_MODEL):
    return open_model(model_id, remote=True, timeout=timeout)


def local_handle(mock_ndif, model_id: str = DEFAULT_MODEL):
    """The same tiny model with real weights, here (built once per session)."""
    if model_id not in _LOCAL:
        local = mock_ndif.local_model(model_id)
        _LOCAL[model_id] = wrap_model(local._module, local.tokenizer, model_id=model_id)
    return _LOCAL[model_id]


def pairs():
    return make_pairs(BASES, INSTRUCTION.phrasings, seed=0)


def jobs_count(mock_ndif) -> int:
    return len(mock_ndif.server._jobs)


def direction(seed: int, width: int = 64) -> torch.Tensor:
    vector = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def edits_for_test() -> list[Edit]:
    return [
        Edit(layer=1, direction=direction(1), mode="set", weight=1.0, target=4.0, name="set"),
        Edit(layer=1, direction=direction(2), mode="add", weight=6.0, positions="generated", name="add"),
        Edit(layer=2, direction=direction(3), mode="ablate", weight=1.0, positions="prompt", name="ablate"),
    ]


def ndif_spec(tmp_path: Path, name: str, **fields) -> dict:
    """A recipe dict for the mock's default model on NDIF, over BASES written to a file, with output under tmp_path."""
    (tmp_path / "bases.jsonl").write_text("".join(f'{{"id": "{b.id}", "text": "{b.text}"}}\n' for b in BASES))
    return {
        "name": name,
        "model": {"id": DEFAULT_MODEL, "backend": "ndif", "timeout": 30},
        "prompts": {"base": str(tmp_path / "bases.jsonl"), "max_pairs": 6},
        "extraction": {"batch_size": 4},
        "output": {"dir": str(tmp_path / "remote")},
        **fields,
    }


@pytest.fixture
def jobs_dir(tmp_path, monkeypatch):
    directory = tmp_path / "jobs"
    monkeypatch.setenv("NSTEER_JOBS_DIR", str(directory))
    return directory


# ----------------------------------------------------------------------------------------------- parity


def test_remote_handle_names_the_hub_model(mock_ndif):
    handle = remote_handle(timeout=12.5)
    local = local_handle(mock_ndif)
    assert handle.remote and handle.execution.timeout == 12.5
    assert handle.model_id == DEFAULT_MODEL and handle.weights_fingerprint == ""
    assert (handle.n_layers, handle.hidden_size, handle.layers_path) == (3, 64, "model.layers")
    assert handle.config_hash == local.config_hash and handle.architecture == local.architecture
    assert handle.device.type == "meta"  # the client holds no weights
    assert '"repo_id": "mock-ndif/tiny-llama"' in handle.model.to_model_key()


def test_extraction_through_mock_equals_local(mock_ndif):
    before = jobs_count(mock_ndif)
    handle = remote_handle()
    remote_vector = compute_vector(handle, INSTRUCTION, pairs(), batch_size=4)
    assert jobs_count(mock_ndif) - before == 1  # 7 pairs in 4 batches: one session, one request
    local_vector = compute_vector(local_handle(mock_ndif), INSTRUCTION, pairs(), batch_size=4)
    for name in ("directions", "mean_projections", "norms"):
        got, expected = getattr(remote_vector, name), getattr(local_vector, name)
        assert got.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Metadata names the remote model; only the weights fingerprint (unknown to a remote client) differs.
    assert dataclasses.replace(local_vector.metadata, weights_fingerprint="") == remote_vector.metadata
    assert mock_ndif.server.worker_info["nsteer_importable"] is False


def test_last_token_sums_through_mock_equal_local(mock_ndif):
    handle = remote_handle()
    tokenizer = handle.tokenizer
    input_ids, attention_mask = left_pad(
        [chat_token_ids(tokenizer, text) for text in PROMPTS[:3]], tokenizer.pad_token_id
    )
    got = last_token_sums(handle, [(input_ids, attention_mask, 1)])
    expected = last_token_sums(local_handle(mock_ndif), [(input_ids, attention_mask, 1)])
    # The mock server computes in another process (and possibly with another thread count): float results agree to
    # rounding, not bit for bit. fp32 activations of unit scale: 1e-5 absolute covers a few ulps per operation.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_steered_generation_through_mock_equals_local(mock_ndif):
    handle = remote_handle()
    local = local_handle(mock_ndif)
    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    edits = edits_for_test()
    row_edits = [edits, [edits[0]], [], [edits[1]], edits[::-1]]
    before = jobs_count(mock_ndif)
    steered = generate_tokens(handle, PROMPTS, row_edits=row_edits, config=config)
    assert jobs_count(mock_ndif) - before == 1  # 5 prompts in 3 batches: one session, one request
    assert steered == generate_tokens(local, PROMPTS, row_edits=row_edits, config=config)
    plain = generate_tokens(handle, PROMPTS, config=config)
    assert plain == generate_tokens(local, PROMPTS, config=config)
    assert plain != steered  # the edits changed something
    texts = generate(handle, PROMPTS[:2], [edits[1]], config=config)
    assert texts == generate(local, PROMPTS[:2], [edits[1]], config=config)


def test_recipe_run_through_mock_writes_what_a_local_run_writes(mock_ndif, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ndif_spec(
        tmp_path,
        "ndif-test",
        instructions={
            "shout": {"phrasings": list(INSTRUCTION.phrasings), "check": "change_case:english_capital"},
            "hush": {"phrasings": ["Answer in lowercase.", "no capitals."], "check": "change_case:english_lowercase"},
        },
    )
    recipe = recipe_from_dict(spec)
    handle = open_recipe_model(recipe)
    assert handle.remote and handle.execution.timeout == 30
    before = jobs_count(mock_ndif)
    written = compute_recipe_vectors(recipe, handle)
    assert jobs_count(mock_ndif) - before == 2  # one request per instruction
    local_recipe = recipe_from_dict(
        {**spec, "model": {"id": DEFAULT_MODEL}, "output": {"dir": str(tmp_path / "local")}}
    )
    local_written = compute_recipe_vectors(local_recipe, local_handle(mock_ndif))
    for name, path in written.items():
        got, expected = load_vector(path), load_vector(local_written[name])
        torch.testing.assert_close(got.directions, expected.directions, rtol=1e-5, atol=1e-6)
        assert got.metadata.model_id == DEFAULT_MODEL
        assert dataclasses.replace(expected.metadata, weights_fingerprint="") == got.metadata
    assert compute_recipe_vectors(recipe, handle) == written and jobs_count(mock_ndif) - before == 2  # rerun: skipped


def test_remote_search_sends_one_request_per_searched_entry(mock_ndif, tmp_path, monkeypatch):
    from nsteer.search import search_recipe

    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        ndif_spec(
            tmp_path,
            "ndif-search",
            instructions={"shout": {"phrasings": list(INSTRUCTION.phrasings), "check": "change_case:english_capital"}},
            steer=[{"instruction": "shout", "layer": "auto", "mode": "add"}],
            search={"layers": [1, 2], "weights": [2.0, 4.0], "max_prompts": 2, "condition": "absent"},
            generation={"max_new_tokens": 3, "batch_size": 4},
        )
    )
    handle = open_recipe_model(recipe)
    compute_recipe_vectors(recipe, handle)
    before = jobs_count(mock_ndif)
    (sweep,) = search_recipe(recipe, handle).sweeps
    assert (
        jobs_count(mock_ndif) - before == 1
    )  # the baseline and 4 settings on the validation prompts: one request, not five
    prompts = sweep.baseline.prompts
    assert len(sweep.cells) == 4 and all(c.prompts == prompts and len(c.answers) == len(prompts) for c in sweep.cells)
    assert load_vector(tmp_path / "remote" / "shout.safetensors").metadata.chosen.layers_searched == (1, 2)


# ------------------------------------------------------------------------------- nnsight's local simulation


def test_every_entry_point_under_remote_local_simulation(mock_ndif, monkeypatch):
    # remote="local" serializes each request as for NDIF, deserializes it with local modules hidden and runs it.
    monkeypatch.setattr(
        Execution, "trace_kwargs", lambda self, model, model_id: {"remote": "local"} if self.remote else {}
    )
    local = local_handle(mock_ndif)
    simulated = dataclasses.replace(local, execution=Execution(remote=True))
    tokenizer = local.tokenizer
    input_ids, attention_mask = left_pad(
        [chat_token_ids(tokenizer, text) for text in PROMPTS[:3]], tokenizer.pad_token_id
    )
    torch.testing.assert_close(
        last_token_sums(simulated, [(input_ids, attention_mask, 2)]),
        last_token_sums(local, [(input_ids, attention_mask, 2)]),
    )
    got = compute_vector(simulated, INSTRUCTION, pairs(), batch_size=4)
    expected = compute_vector(local, INSTRUCTION, pairs(), batch_size=4)
    torch.testing.assert_close(got.directions, expected.directions, rtol=1e-6, atol=1e-7)
    config = GenerationConfig(max_new_tokens=5, batch_size=2)
    edits = edits_for_test()
    assert generate_tokens(simulated, PROMPTS, edits, config=config) == generate_tokens(
        local, PROMPTS, edits, config=config
    )
    plan = compile_plan([edits, []])
    kwargs = config.generate_kwargs(tokenizer.pad_token_id)
    assert torch.equal(
        steered_generate_batches(simulated, [(input_ids[:2], attention_mask[:2], plan)], kwargs)[0],
        steered_generate_batches(local, [(input_ids[:2], attention_mask[:2], plan)], kwargs)[0],
    )


# ---------------------------------------------------------------------------------------- non-blocking


def test_submit_and_collect_vectors_and_answers(mock_ndif, tmp_path, jobs_dir):
    handle = remote_handle()
    path = tmp_path / "shout.safetensors"
    job = jobs.submit_vector(handle, INSTRUCTION, pairs(), path=path, batch_size=4)
    assert job.id and not path.exists() and (jobs_dir / f"{job.id}.json").is_file()
    assert [pending.id for pending in jobs.pending_jobs()] == [job.id]
    collected = jobs.collect(job.id, wait=30)
    assert collected.done and collected.paths == {"shout": path}
    expected = compute_vector(local_handle(mock_ndif), INSTRUCTION, pairs(), batch_size=4)
    vector = load_vector(path)
    for name in ("directions", "mean_projections", "norms"):
        torch.testing.assert_close(getattr(vector, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    assert vector.metadata == dataclasses.replace(expected.metadata, weights_fingerprint="")
    assert jobs.pending_jobs() == [] and (jobs_dir / "done" / f"{job.id}.json").is_file()

    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    edits = edits_for_test()[:2]
    before = jobs_count(mock_ndif)
    job = jobs.submit_generation(handle, PROMPTS, edits, config=config)
    assert jobs_count(mock_ndif) - before == 1
    collected = jobs.collect(job.id, wait=30)
    assert collected.tokens == generate_tokens(local_handle(mock_ndif), PROMPTS, edits, config=config)
    assert collected.answers == generate(local_handle(mock_ndif), PROMPTS, edits, config=config)


def test_submitted_recipe_vectors_are_the_ones_compute_would_make(mock_ndif, tmp_path, jobs_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        ndif_spec(
            tmp_path,
            "ndif-submit",
            instructions={"include:ocean": {}, "exclude:ocean": {}},
            steer=[
                {"instruction": "exclude:ocean", "vector": "include:ocean", "layer": 1, "mode": "add", "weight": -2.0}
            ],
        )
    )
    before = jobs_count(mock_ndif)
    submitted = jobs.submit_recipe_vectors(recipe, open_recipe_model(recipe))
    assert set(submitted) == {"include:ocean"}  # the exclusion borrows the inclusion vector: no job of its own
    assert jobs_count(mock_ndif) - before == 1


def test_cli_no_wait_then_collect(mock_ndif, tmp_path, jobs_dir, monkeypatch):
    from nsteer.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        f"name: r\nmodel: {{id: {DEFAULT_MODEL}, backend: ndif, timeout: 30}}\n"
        "prompts: {base: 'builtin:base-v1', max_pairs: 4}\ninstructions: {lowercase: {}}\n"
        "extraction: {batch_size: 8}\n"
    )
    runner = CliRunner()
    submitted = runner.invoke(app, ["compute", "r.yaml", "--no-wait"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.split("job ")[1].split()[0]
    mock_ndif.server.wait_idle()
    collected = runner.invoke(app, ["collect", job_id, "--wait", "30"])
    assert collected.exit_code == 0, collected.output
    assert Path("runs/r/lowercase.safetensors").is_file() and "lowercase.safetensors" in collected.stdout.replace(
        "\n", ""
    )
    assert load_vector("runs/r/lowercase.safetensors").metadata.model_id == DEFAULT_MODEL
    again = runner.invoke(app, ["collect", "--all"])
    assert "No job to collect" in str(again.exception) or again.exit_code != 0


def test_collect_of_a_job_still_running(mock_ndif, tmp_path, jobs_dir):
    mock_ndif.fail("stall", hold_s=5)
    job = jobs.submit_vector(remote_handle(), INSTRUCTION, pairs()[:2], path=tmp_path / "v.safetensors")
    collected = jobs.collect(job.id)
    assert not collected.done and collected.status in ("RECEIVED", "QUEUED", "RUNNING", "not started")
    assert jobs.pending_jobs()[0].id == job.id  # still pending
    with pytest.raises(RemoteError, match="No record of job"):
        jobs.collect("0123456789abcdef")
    mock_ndif.fail("exec_error")
    failed = jobs.submit_vector(remote_handle(), INSTRUCTION, pairs()[:2], path=tmp_path / "w.safetensors")
    with pytest.raises(RemoteError, match=r"NDIF reported an error.*injected.*submit it again"):
        jobs.collect(failed.id, wait=30)
    assert [job.id for job in jobs.pending_jobs()] == [job.id]  # the failed one is no longer pending


def test_no_wait_needs_ndif(tmp_path, monkeypatch):
    from nsteer.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("name: r\ninstructions: {lowercase: {}}\n")
    result = CliRunner().invoke(app, ["compute", "r.yaml", "--no-wait"])
    assert "--no-wait submits NDIF jobs: add --remote" in str(result.exception)


# -------------------------------------------------------------------------------------------- failures


def run_extraction(handle):
    return compute_vector(handle, INSTRUCTION, pairs()[:2], batch_size=4)


def test_missing_key_is_caught_before_sending(mock_ndif, monkeypatch):
    from nnsight import CONFIG

    handle = remote_handle()
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    before = jobs_count(mock_ndif)
    with pytest.raises(
        RemoteError, match=r"No NDIF API key found\. Create one at https://login\.ndif\.us/.*NDIF_API_KEY"
    ):
        run_extraction(handle)
    with pytest.raises(RemoteError, match="No NDIF API key found"):
        remote_handle()
    assert jobs_count(mock_ndif) == before and not mock_ndif.server.log  # nothing reached the server


def test_rejected_key(mock_ndif, monkeypatch):
    from nnsight import CONFIG

    handle = remote_handle()
    monkeypatch.setattr(CONFIG.API, "APIKEY", SECRET)
    with pytest.raises(
        RemoteError, match=r"NDIF refused the API key \(HTTP 401.*NDIF_API_KEY.*login\.ndif\.us"
    ) as caught:
        run_extraction(handle)
    assert SECRET not in str(caught.value)
    mock_ndif.fail("auth", status=403, detail="Forbidden: key revoked.")
    with pytest.raises(RemoteError, match=r"refused the API key \(HTTP 403: Forbidden: key revoked\.\)"):
        run_extraction(handle)


def test_unknown_model(mock_ndif):
    with pytest.raises(
        RemoteError, match=r"Could not read the config and tokenizer of 'nobody/no-such-model'.*Check the id"
    ):
        remote_handle(model_id="nobody/no-such-model")
    with pytest.raises(RemoteError, match="is a local model; NDIF runs models named by their Hugging Face Hub id"):
        open_model("embedded:smollm2-135m-instruct", remote=True)


def test_offline_model(mock_ndif):
    handle = remote_handle(model_id=UNDEPLOYED_MODEL)  # on the Hub, not deployed on NDIF
    with pytest.raises(
        RemoteError, match=r"NDIF is not serving mock-ndif/tiny-llama-offline right now.*nnsight\.status"
    ):
        run_extraction(handle)
    mock_ndif.fail("offline")
    with pytest.raises(RemoteError, match="is not serving mock-ndif/tiny-llama right now"):
        generate_tokens(remote_handle(), PROMPTS[:1], config=GenerationConfig(max_new_tokens=2))


def test_timeout_uses_nsteers_deadline(mock_ndif):
    mock_ndif.fail("stall", hold_s=10)
    with pytest.raises(
        RemoteError,
        match=(
            r"did not finish the request for mock-ndif/tiny-llama \(job \w+\) "
            r"within nsteer's deadline of 1 s.*model\.timeout"
        ),
    ):
        run_extraction(remote_handle(timeout=1))
    mock_ndif.fail("hang", hold_s=10)  # the request itself is never answered
    with pytest.raises(
        RemoteError, match=r"did not answer the request for mock-ndif/tiny-llama within 1 s.*model\.timeout"
    ):
        run_extraction(remote_handle(timeout=1))


def test_server_side_errors(mock_ndif):
    handle = remote_handle()
    mock_ndif.fail("exec_error")
    with pytest.raises(
        RemoteError,
        match=r"NDIF reported an error while running the request for mock-ndif/tiny-llama \(job \w+\): .*injected",
    ):
        run_extraction(handle)
    mock_ndif.fail("http", status=503)
    with pytest.raises(
        RemoteError, match=r"NDIF could not take the request .*HTTP 503: Service Unavailable.*try again later"
    ):
        run_extraction(handle)
    # NDIF's own deadline and out-of-memory (texts as the server reports them; killing the mock's worker for real
    # would cost the next test a worker restart).
    from nnsight.intervention.backends.remote import RemoteError as ServerError

    backend = NdifBackend(handle.model, model_id=handle.model_id, timeout=5, api_key="not-a-real-key-0042", job_id="j1")
    for text, hint in (
        ("mock NDIF: job exceeded the server's deadline of 60 s", "NDIF's own time limit"),
        ("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.", "lower extraction.batch_size"),
    ):
        translated = translate_error(ServerError(text), backend=backend)
        assert "NDIF reported an error while running the request for mock-ndif/tiny-llama (job j1)" in str(translated)
        assert hint in str(translated)


@pytest.mark.parametrize("phase", ["post", "poll", "download"])
def test_dropped_connection(mock_ndif, phase):
    mock_ndif.fail("drop", phase=phase)
    if phase == "download":
        mock_ndif.server.inline_limit = 0  # the result comes as a url to download
    expected = {"post": "sending the request", "poll": "waiting for the result", "download": "downloading the result"}
    with pytest.raises(
        RemoteError, match=rf"connection to NDIF at http://127\.0\.0\.1:\d+ dropped while {expected[phase]}.*rerun"
    ):
        run_extraction(remote_handle())


def test_unreachable_server(mock_ndif, monkeypatch):
    import socket

    from nnsight import CONFIG

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteError, match=r"Could not reach NDIF at http://127\.0\.0\.1:\d+ .*NDIF_HOST"):
        run_extraction(remote_handle())


# ------------------------------------------------------------------------------------------------ the key


def test_api_key_never_leaks(mock_ndif, tmp_path, jobs_dir, monkeypatch, capfd, caplog):
    from nnsight import CONFIG

    from nsteer.cli import app

    caplog.set_level(logging.DEBUG)
    mock_ndif.server.api_keys.add(SECRET)
    monkeypatch.setattr(CONFIG.API, "APIKEY", SECRET)
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        f"name: r\nmodel: {{id: {DEFAULT_MODEL}, backend: ndif, timeout: 30}}\n"
        "prompts: {base: 'builtin:base-v1', max_pairs: 4}\ninstructions: {lowercase: {}}\n"
        "steer: [{instruction: lowercase, layer: 1, mode: add, weight: 4}]\n"
        "generation: {max_new_tokens: 4}\ndemo_prompts: ['Hello there.']\n"
    )
    runner = CliRunner()
    outputs = [runner.invoke(app, ["compute", "r.yaml"]), runner.invoke(app, ["generate", "r.yaml"])]
    outputs.append(runner.invoke(app, ["generate", "r.yaml", "--no-wait"]))
    job_id = outputs[-1].stdout.split("job ")[1].split()[0]
    outputs.append(runner.invoke(app, ["collect", job_id, "--wait", "30"]))
    assert all(result.exit_code == 0 for result in outputs), [result.output for result in outputs]
    messages = []
    for kind, options in (("exec_error", {}), ("stall", {"hold_s": 5})):
        mock_ndif.fail(kind, **options)
        with pytest.raises(RemoteError) as caught:
            run_extraction(remote_handle(timeout=1))
        messages.append(caught.value)
    mock_ndif.fail(None)
    monkeypatch.setattr(CONFIG.API, "APIKEY", SECRET + "-revoked")
    with pytest.raises(RemoteError) as caught:
        run_extraction(remote_handle())
    messages.append(caught.value)
    mock_ndif.fail(None)

    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text] + [result.output for result in outputs]
    for error in messages:
        chain = error
        while chain is not None:
            texts.append(str(chain))
            chain = chain.__cause__
    assert all(SECRET not in text for text in texts)
    written = [path for path in list(tmp_path.rglob("*")) + list(jobs_dir.rglob("*")) if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in written) and any(path.suffix == ".json" for path in written)
    assert all(SECRET.encode() not in path.read_bytes() for path in written)


def test_gates_clamps_and_skipped_tokens_through_mock_equal_local(mock_ndif):
    """The gate's decision, the clamp and skip-first run inside the same trace on the server as they do locally."""
    handle = remote_handle()
    local = local_handle(mock_ndif)
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    set_, add, _ = edits_for_test()
    row_edits = [
        [dataclasses.replace(add, gate=0.0, gate_direction=set_.direction)],
        [dataclasses.replace(add, bound=1.0, skip_first=True)],
        [dataclasses.replace(set_, skip_first=True), dataclasses.replace(add, gate=1e6)],
        [dataclasses.replace(add, gate=-1e6)],  # closed: every last token projects above it
        [],
    ]
    steered = generate_tokens(handle, PROMPTS, row_edits=row_edits, config=config)
    assert steered == generate_tokens(local, PROMPTS, row_edits=row_edits, config=config)
    plain = generate_tokens(local, PROMPTS, config=config)
    assert steered[3] == plain[3] and steered[4] == plain[4]
