"""What NDIF sends back is data, checked before use; job records are data; the API key goes only to the NDIF host.

A hostile server is played by the mock (``fail("result", payload=...)``): every job's result is replaced with the
bytes a test chooses, compressed as the request asked. nnsight's own client would unpickle them with
``weights_only=False``; nsteer's backend must not run anything in them, must refuse what the trace does not compute,
and must write nothing from a refused result. Job records under the jobs folder are files a test can damage or
point at another host.
"""

from __future__ import annotations

import http.server
import io
import json
import random
import threading
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

import nsteer.jobs as jobs
from nsteer.errors import NsteerError, RemoteError
from nsteer.execution import ndif
from nsteer.extract import compute_vector
from nsteer.generate import GenerationConfig, generate_tokens
from nsteer.models import open_model
from nsteer.prompts import BasePrompt, Instruction, make_pairs

try:
    from mock_ndif.tiny_models import DEFAULT_MODEL
except ImportError:  # the repository root on sys.path instead of tests/
    from tests.mock_ndif.tiny_models import DEFAULT_MODEL

LAYERS, WIDTH = 3, 64  # the mock's default model
INSTRUCTION = Instruction(
    "shout", "format", "answer in capitals", "change_case:english_capital", {}, ("Use capitals.",)
)
PAIRS = make_pairs(
    [BasePrompt(f"b{i}", text) for i, text in enumerate(["Why?", "What is rain?"])], ["Use capitals."], 0
)


class Opens:
    """A pickled object that, when unpickled by a plain unpickler, creates the file it names (harmless proof)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture
def jobs_dir(tmp_path, monkeypatch):
    directory = tmp_path / "jobs"
    monkeypatch.setenv("NSTEER_JOBS_DIR", str(directory))
    return directory


def remote():
    return open_model(DEFAULT_MODEL, remote=True, timeout=30)


def submit(tmp_path: Path) -> tuple[jobs.RemoteJob, Path]:
    path = tmp_path / "out" / "shout.safetensors"
    return jobs.submit_vector(remote(), INSTRUCTION, PAIRS, path=path, batch_size=4), path


# ------------------------------------------------------------------------------------------ results as data only


def test_a_pickle_that_runs_code_is_never_unpickled(mock_ndif, tmp_path, jobs_dir):
    marker = tmp_path / "ran"
    payload = saved({"sums": Opens(marker)})
    control = tmp_path / "control"
    torch.load(io.BytesIO(saved({"sums": Opens(control)})), weights_only=False)  # what nnsight's own loader does
    assert control.exists()  # so the payload really is hostile
    mock_ndif.fail("result", payload=payload)
    with pytest.raises(RemoteError, match="refused: it asks to run code.*data only") as blocking:
        compute_vector(remote(), INSTRUCTION, PAIRS, batch_size=4)
    assert not marker.exists()
    assert "NDIF_HOST" in str(blocking.value)
    job, path = submit(tmp_path)
    with pytest.raises(RemoteError, match="asks to run code"):
        jobs.collect(job.id, wait=30)
    assert not marker.exists() and not path.exists()
    assert [pending.id for pending in jobs.pending_jobs()] == [job.id]  # refused, so still there to collect later


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"sums": 5}, "The result 'sums' is a int, not a tensor"),
        ({"sums": torch.zeros(2, LAYERS + 1, WIDTH, dtype=torch.float64)}, "has shape [2, 4, 64], not [2, 3, 64]"),
        ({"sums": torch.ones(2, LAYERS, WIDTH, dtype=torch.float32)}, "is float32, not float64"),
        ({"sums": torch.full((2, LAYERS, WIDTH), float("nan"), dtype=torch.float64)}, "holds NaN or infinite values"),
        ({"sums": torch.zeros(2, LAYERS, WIDTH, dtype=torch.float64)}, "No direction can be computed"),
        ({"other": torch.ones(2)}, "The result 'sums' is a NoneType"),
        ([1, 2, 3], "it is a list, not the mapping of saved names"),
    ],
)
def test_results_that_are_not_what_extraction_computes_write_nothing(mock_ndif, tmp_path, jobs_dir, value, fragment):
    mock_ndif.fail("result", payload=saved(value))
    job, path = submit(tmp_path)
    with pytest.raises(NsteerError) as raised:
        jobs.collect(job.id, wait=30)
    assert fragment in " ".join(str(raised.value).split())
    assert not path.exists()  # in particular, no all-zero "vector" that later runs would take as up to date
    if "sums" in fragment or "mapping" in fragment:  # the blocking path refuses the same values
        with pytest.raises(NsteerError, match="refused|not a tensor|shape|float64|NaN|mapping"):
            compute_vector(remote(), INSTRUCTION, PAIRS, batch_size=4)


def test_generated_ids_are_checked_before_decoding(mock_ndif, tmp_path, jobs_dir):
    handle = remote()
    prompts = ["Hi!", "Why?"]
    config = GenerationConfig(max_new_tokens=3, batch_size=2)
    ids = torch.full((2, 40), 10**9, dtype=torch.long)  # no tokenizer has a billion tokens
    mock_ndif.fail("result", payload=saved({"outputs": [ids]}))
    with pytest.raises(RemoteError, match=r"holds values outside \[0, \d+\)"):
        generate_tokens(handle, prompts, config=config)
    mock_ndif.fail("result", payload=saved({"outputs": [ids[:1, :5], ids[:1, :5]]}))
    with pytest.raises(RemoteError, match="holds 2 items, not 1"):
        generate_tokens(handle, prompts, config=config)
    mock_ndif.fail("result", payload=saved({"outputs": [torch.full((2, 40), 10**6, dtype=torch.long)]}))
    job = jobs.submit_generation(handle, prompts, config=config)  # the mock answers it with that payload
    with pytest.raises(RemoteError, match="token ids beyond"):
        jobs.collect(job.id, wait=30)


def test_a_compressed_result_that_expands_past_the_bound_is_refused(monkeypatch):
    import zstandard

    monkeypatch.setattr(ndif, "MAX_RESULT_BYTES", 1 << 20)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (8 << 20))  # a few hundred bytes, 8 MiB expanded
    assert len(bomb) < 4096
    with pytest.raises(RemoteError, match="expands to more than"):
        ndif.load_result(bomb, compressed=True)
    with pytest.raises(RemoteError, match="not a zstd stream"):
        ndif.load_result(b"not zstd at all", compressed=True)
    assert ndif.load_result(saved({"sums": torch.ones(2)}), compressed=False)["sums"].tolist() == [1.0, 1.0]


def test_a_download_past_the_bound_is_stopped_before_it_is_read_whole(mock_ndif, tmp_path, jobs_dir, monkeypatch):
    monkeypatch.setattr(ndif, "MAX_RESULT_BYTES", 1 << 20)
    unpickled = []
    monkeypatch.setattr(ndif, "load_result", lambda content, compressed: unpickled.append(len(content)))
    # random bytes stay 8 MiB when the mock compresses them; a collected job's result is always a download URL
    mock_ndif.fail("result", payload=random.Random(0).randbytes(8 << 20))
    job, path = submit(tmp_path)
    with pytest.raises(RemoteError, match="it is larger than 1 MiB"):
        jobs.collect(job.id, wait=30)
    assert unpickled == [] and not path.exists()


@pytest.mark.parametrize("address", ["file:///etc/passwd", "ftp://example.org/result", 42])
def test_a_result_address_that_is_not_http_is_refused(address):
    backend = object.__new__(ndif.NdifBackend)  # only download_result runs: no request, no model
    with pytest.raises(RemoteError, match="download address is not an http"):
        ndif.NdifBackend.download_result(backend, address)


# --------------------------------------------------------------------------------------------------- job records


class Recorder(http.server.BaseHTTPRequestHandler):
    """A foreign host: records every request (and its headers) it receives."""

    seen: list[dict] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        Recorder.seen.append(dict(self.headers))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_job_record_naming_another_host_gets_no_request_and_no_key(mock_ndif, tmp_path, jobs_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        job, path = submit(tmp_path)
        record = jobs_dir / f"{job.id}.json"
        data = json.loads(record.read_text())
        data["host"] = f"http://127.0.0.1:{server.server_address[1]}"
        record.write_text(json.dumps(data))
        Recorder.seen.clear()
        with pytest.raises(RemoteError, match="was submitted to http://127.0.0.1:.* requests now go to .*not fetched"):
            jobs.collect(job.id, wait=5)
        assert Recorder.seen == []  # nothing reached it, so neither did the API key
        assert not path.exists()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "[" * 100_000, "nested too deeply"),
        (lambda text: json.dumps({**json.loads(text), "kind": "exfiltrate"}), "unknown kind 'exfiltrate'"),
        (lambda text: json.dumps({**json.loads(text), "extra": 1}), "has unknown field(s) extra"),
        (lambda text: json.dumps({**json.loads(text), "created": "yesterday"}), "its field created is 'yesterday'"),
        (lambda text: json.dumps({**json.loads(text), "host": "file:///etc/passwd"}), "is not an http(s) url"),
        (lambda text: json.dumps({**json.loads(text), "id": "someone-else"}), "holds job 'someone-else'"),
    ],
)
def test_damaged_job_records_are_named_and_refused(mock_ndif, tmp_path, jobs_dir, damage, fragment):
    job, _ = submit(tmp_path)
    record = jobs_dir / f"{job.id}.json"
    record.write_text(damage(record.read_text()))
    with pytest.raises(RemoteError) as raised:
        jobs.collect(job.id)
    assert fragment in str(raised.value) and (str(record) in str(raised.value) or "unknown kind" in fragment)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"path": "/etc/passwd"}, "payload field path is '/etc/passwd'"),  # not a vector file's name
        ({"path": "relative/v.safetensors"}, "payload field path"),
        ({"n_pairs": 0}, "payload field n_pairs is 0"),
        ({"keep_choice": "yes"}, "payload field keep_choice"),
    ],
)
def test_a_job_payload_is_checked_before_anything_is_written(mock_ndif, tmp_path, jobs_dir, payload, fragment):
    job, path = submit(tmp_path)
    record = jobs_dir / f"{job.id}.json"
    data = json.loads(record.read_text())
    data["payload"].update(payload)
    record.write_text(json.dumps(data))
    with pytest.raises(RemoteError, match=fragment.replace("(", r"\(")):
        jobs.collect(job.id, wait=30)
    assert not path.exists()


def test_collect_never_replaces_a_file_that_is_not_a_vector(mock_ndif, tmp_path, jobs_dir):
    job, path = submit(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("my notes, not a vector")
    with pytest.raises(RemoteError, match="holds something other than a readable vector"):
        jobs.collect(job.id, wait=30)
    assert path.read_text() == "my notes, not a vector"


def test_collect_all_reports_a_bad_record_and_collects_the_others(mock_ndif, tmp_path, jobs_dir, monkeypatch, capsys):
    good, path = submit(tmp_path)
    mock_ndif.server.wait_idle()
    (jobs_dir / "truncated.json").write_text('{"id": "truncated", "kind": "vec')
    (jobs_dir / "stranger.json").write_text(json.dumps({"id": "stranger", "kind": "mystery"}))
    code, out, err = run_cli(monkeypatch, capsys, "collect", "--all", "--wait", "30")
    message = " ".join(err.split())
    assert code == 2 and "2 of 3 job(s) could not be collected" in message
    assert "truncated.json is damaged (not valid JSON" in message and "stranger" in message
    assert path.is_file() and "shout" in out  # the good job was collected all the same
    assert "Traceback" not in out + err
