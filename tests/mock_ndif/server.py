"""A loopback mock of NDIF that speaks nnsight 0.8.1's real remote protocol.

``nnsight``'s own ``RemoteBackend`` talks to it unchanged; point the client at
``MockNDIF.url`` (``NDIF_HOST`` / ``CONFIG.API.HOST`` / ``remote="http://..."``).
See NOTES.md for the protocol.

* HTTP on 127.0.0.1, ephemeral port (stdlib ``ThreadingHTTPServer``):
  ``POST /request`` (multipart: form field ``data`` = RequestModel JSON, file
  ``blob`` = the serialized trace), ``GET /response/{id}`` (latest status, for
  ``blocking=False``), ``GET /result/{id}`` (the result blob a COMPLETED status
  points at), ``GET /subscribe`` (websocket, for the blocking client), and
  ``/ping``, ``/status``, ``/env``, ``/whoami``.
* Every job runs in a separate worker process (``worker.py``) where the
  repository is off ``sys.path`` and ``import nsteer`` fails.
* Everything is bounded: each job has a deadline (the worker is killed and
  replaced past it), each held connection is released at its deadline or at
  ``stop()``.
* Failures on demand (``fail(...)``): ``"auth"``, ``"offline"``, ``"hang"``,
  ``"stall"``, ``"exec_error"``, ``"drop"`` (``phase=`` ``"post"``, ``"ws"``,
  ``"poll"``, ``"download"``), ``"http"``, and ``"result"``: a hostile server
  that answers every job with ``payload`` (raw bytes, compressed as the request
  asked) instead of what the job computed.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import os
import pickle
import queue
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nnsight.schema.response import ResponseModel, Status

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKER = HERE / "worker.py"

DEFAULT_API_KEY = "mock-ndif-key"
INVALID_KEY_DETAIL = "Missing or invalid API key. Please visit https://login.ndif.us/ to create a new one."
NOT_DEPLOYED_DETAIL = (
    "Model is not dedicated and hotswapping is not supported for this API key. "
    "See https://nnsight.net/status/ for a list of scheduled models."
)
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _Channel:
    """Length-prefixed pickles over a loopback socket (the worker has the twin)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(struct.pack("!Q", len(data)) + data)

    def poll(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(readable)

    def recv(self, timeout: float | None = None) -> Any:
        self.sock.settimeout(timeout)
        try:
            (length,) = struct.unpack("!Q", _recv_exact(self.sock, 8))
            return pickle.loads(_recv_exact(self.sock, length))
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class Failure:
    """How the server misbehaves (``MockNDIF.fail``); ``None`` kind = behave."""

    kind: str | None = None
    #: "drop": where the connection is cut — "post", "ws", "poll", "download".
    phase: str = "post"
    #: "auth" / "http": HTTP status and detail of the refusal.
    status: int = 401
    detail: str | None = None
    #: "offline": only these repo ids (empty: every model).
    models: tuple = ()
    #: "hang" / "stall": how long to hold before giving up (None: the job deadline).
    hold_s: float | None = None
    #: "result": the bytes every job's result is replaced with (what a hostile server sends).
    payload: bytes = b""
    #: Set when this failure is replaced (``fail``/``reset``) or the server stops:
    #: whatever it holds lets go at once.
    released: threading.Event = field(default_factory=threading.Event, repr=False)


KINDS = {"auth", "offline", "hang", "stall", "exec_error", "drop", "http", "result"}


@dataclass
class Job:
    id: str
    model_key: str
    repo_id: str | None
    env: dict
    compress: bool
    blob: bytes
    session_id: str
    failure: Failure
    created: float = field(default_factory=time.time)
    latest: ResponseModel | None = None
    result: bytes | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Session:
    """One ``/subscribe`` websocket: what the job thread wants sent on it."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.outbox: queue.Queue[tuple[str, Any]] = queue.Queue()


# ----------------------------------------------------------------------- websocket


def _ws_frame(payload: bytes, opcode: int) -> bytes:
    header = bytes([0x80 | opcode])
    length = len(payload)
    if length < 126:
        header += bytes([length])
    elif length < 1 << 16:
        header += bytes([126]) + struct.pack("!H", length)
    else:
        header += bytes([127]) + struct.pack("!Q", length)
    return header + payload


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("websocket peer went away")
        data += chunk
    return data


def _ws_read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = _recv_exact(sock, 2)
    opcode = first & 0x0F
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _recv_exact(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _recv_exact(sock, 8))
    mask = _recv_exact(sock, 4) if second & 0x80 else b"\0\0\0\0"
    payload = bytearray(_recv_exact(sock, length))
    for index in range(length):
        payload[index] ^= mask[index % 4]
    return opcode, bytes(payload)


# ----------------------------------------------------------------------- the server


class MockNDIF:
    """The mock service: HTTP front, one job thread, one worker process.

    Args:
        hub_cache: the fake-Hub cache (``fake_hub.write_fake_hub``) the worker
            resolves Hub ids from.
        deployed: the Hub ids this server runs; anything else is "not deployed".
        api_keys: keys accepted in the ``ndif-api-key`` header.
        job_timeout_s: the deadline of one job, queueing excluded.
        inline_limit: a blocking client gets results up to this many bytes in a
            binary websocket frame, larger ones as a download url (NDIF does both).
        strict_imports: hold shipped code to the NDIF-like import whitelist.
        blocked: packages the worker must not be able to import.
    """

    def __init__(
        self,
        hub_cache: str | os.PathLike,
        deployed: tuple[str, ...] | list[str],
        api_keys: tuple[str, ...] = (DEFAULT_API_KEY,),
        job_timeout_s: float = 60.0,
        worker_start_timeout_s: float = 120.0,
        inline_limit: int = 4 << 20,
        strict_imports: bool = True,
        blocked: tuple[str, ...] = ("nsteer",),
    ) -> None:
        self.hub_cache = str(hub_cache)
        self.deployed = set(deployed)
        self.default_api_keys = tuple(api_keys)
        self.api_keys = set(api_keys)
        self.job_timeout_s = job_timeout_s
        self.default_job_timeout_s = job_timeout_s
        self.worker_start_timeout_s = worker_start_timeout_s
        self.default_inline_limit = inline_limit
        self.inline_limit = inline_limit
        self.strict_imports = strict_imports
        self.blocked = tuple(blocked)
        self.failure = Failure()
        #: (kind, job id / path, description) for everything that went wrong, newest last.
        self.log: list[tuple[str, str, str]] = []
        self.worker_info: dict | None = None

        self._jobs: dict[str, Job] = {}
        self._sessions: dict[str, _Session] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._worker: subprocess.Popen | None = None
        self._worker_conn: _Channel | None = None
        self._listener: socket.socket | None = None
        self._authkey = secrets.token_bytes(16)
        self._scratch = tempfile.mkdtemp(prefix="mock-ndif-worker-")

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> MockNDIF:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._spawn_worker()
        handler = type("Handler", (_Handler,), {"mock": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        for target, name in ((self._httpd.serve_forever, "http"), (self._run_jobs, "jobs")):
            thread = threading.Thread(target=target, name=f"mock-ndif-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._await_worker()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.failure.released.set()
        self._queue.put(None)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for session in list(self._sessions.values()):
            session.outbox.put(("close", None))
        self._kill_worker()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> MockNDIF:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- per-test configuration ----------------------------------------------

    def fail(self, kind: str | None, **options: Any) -> None:
        """Misbehave from now on (``kind=None`` behaves again). See ``Failure``."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; one of {sorted(KINDS)}")
        if "models" in options:
            options["models"] = tuple(options["models"])
        previous, self.failure = self.failure, Failure(kind=kind, **options)
        previous.released.set()

    def reset(self) -> None:
        """Back to defaults: no failure, default keys, inline limit and job deadline."""
        previous, self.failure = self.failure, Failure()
        previous.released.set()
        self.api_keys = set(self.default_api_keys)
        self.inline_limit = self.default_inline_limit
        self.job_timeout_s = self.default_job_timeout_s
        self.log.clear()

    def deploy(self, repo_id: str) -> None:
        """Run ``repo_id`` from now on (it must be in the fake Hub cache)."""
        self.deployed.add(repo_id)

    def undeploy(self, repo_id: str) -> None:
        self.deployed.discard(repo_id)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until every job has finished (or failed)."""
        deadline = time.time() + timeout_s
        for job in list(self._jobs.values()):
            job.done.wait(max(0.0, deadline - time.time()))

    # -- worker ---------------------------------------------------------------

    def _spawn_worker(self) -> None:
        address = self._listener.getsockname()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "NDIF_", "PYTEST"))}
        env.update(
            {
                "MOCK_NDIF_WORKER_ADDR": f"{address[0]}:{address[1]}",
                "MOCK_NDIF_WORKER_KEY": self._authkey.hex(),
                "MOCK_NDIF_REPO_ROOT": str(REPO_ROOT),
                "MOCK_NDIF_BLOCKED": ",".join(self.blocked),
                "MOCK_NDIF_STRICT_IMPORTS": "1" if self.strict_imports else "0",
                "HF_HUB_CACHE": self.hub_cache,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
            }
        )
        self._worker = subprocess.Popen(
            [sys.executable, "-I", str(WORKER)],
            cwd=self._scratch,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        self._worker_conn = None

    def _await_worker(self) -> None:
        """Accept the worker's connection and read its hello (bounded)."""
        if self._worker_conn is not None:
            return
        assert self._listener is not None
        deadline = time.time() + self.worker_start_timeout_s
        connection = None
        while connection is None:
            remaining = deadline - time.time()
            if remaining <= 0 or self._worker is None or self._worker.poll() is not None:
                self._kill_worker()
                raise RuntimeError("mock NDIF worker did not start in time (or died)")
            self._listener.settimeout(min(1.0, remaining))
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            candidate = _Channel(sock)
            try:
                kind, token, info = candidate.recv(timeout=max(1.0, deadline - time.time()))
            except (OSError, ValueError, pickle.UnpicklingError, struct.error):
                candidate.close()
                continue
            if kind != "hello" or not secrets.compare_digest(token, self._authkey.hex()):
                candidate.close()
                continue
            connection = candidate
        if info["nsteer_importable"] and "nsteer" in self.blocked:
            connection.close()
            self._kill_worker()
            raise RuntimeError("isolation failed: the mock NDIF worker can import nsteer")
        self.worker_info = info
        self._worker_conn = connection

    def _kill_worker(self) -> None:
        if self._worker_conn is not None:
            try:
                self._worker_conn.send(("stop",))
            except OSError:
                pass
            self._worker_conn.close()
            self._worker_conn = None
        if self._worker is not None:
            try:
                self._worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait(timeout=10)
            self._worker = None

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.poll() is not None:
            self._kill_worker()
            self._spawn_worker()
        self._await_worker()

    def _abandon_worker(self) -> None:
        """A job overran: kill the worker outright; the next job starts a new one."""
        if self._worker is not None:
            self._worker.kill()
        self._kill_worker()

    # -- jobs -----------------------------------------------------------------

    def _update(
        self, job: Job, status: Status, description: str = "", data: Any = None, meta: dict | None = None
    ) -> None:
        response = ResponseModel(id=job.id, status=status, description=description, data=data, meta=meta)
        job.latest = response
        session = self._sessions.get(job.session_id) if job.session_id else None
        if session is None:
            return
        if status == Status.COMPLETED and isinstance(data, (bytes, bytearray)):
            session.outbox.put(("binary", response.pickle()))
        else:
            session.outbox.put(("text", response.model_dump_json()))

    def _finish_error(self, job: Job, description: str) -> None:
        self.log.append(("error", job.id, description))
        self._update(job, Status.ERROR, description, meta={"mock": True})
        job.done.set()

    def _run_jobs(self) -> None:
        while not self._stopping.is_set():
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run_one(job)
            except Exception:  # noqa: BLE001 - never let the job thread die
                self._finish_error(job, "mock NDIF internal error:\n" + traceback.format_exc())

    def _run_one(self, job: Job) -> None:
        failure = job.failure
        deadline = job.created + self.job_timeout_s
        self._update(job, Status.QUEUED, "Moved to position 1 in Queue.")

        if job.repo_id not in self.deployed or (
            failure.kind == "offline" and (not failure.models or job.repo_id in failure.models)
        ):
            self._finish_error(job, NOT_DEPLOYED_DETAIL)
            return

        if failure.kind == "drop" and failure.phase == "ws":
            session = self._sessions.get(job.session_id)
            if session is not None:
                session.outbox.put(("drop", None))
            job.done.set()
            return

        if failure.kind == "stall":
            hold = failure.hold_s if failure.hold_s is not None else self.job_timeout_s
            self._update(job, Status.RUNNING, "Your job has started running.")
            self._hold(failure, hold)
            self._finish_error(job, "mock NDIF: a stalled job was dropped")
            return

        self._ensure_worker()
        self._update(job, Status.DISPATCHED, "Your job has been sent to the model deployment.")
        self._update(job, Status.RUNNING, "Your job has started running.")
        self._worker_conn.send(("run", job.id, job.model_key, job.env, job.compress, job.blob, failure.kind))
        remaining = max(0.1, deadline - time.time())
        if not self._worker_conn.poll(remaining):
            self._abandon_worker()
            self._finish_error(job, f"mock NDIF: job exceeded the server's deadline of {self.job_timeout_s:.0f} s")
            return
        try:
            reply = self._worker_conn.recv(timeout=max(5.0, deadline - time.time()))
        except (OSError, EOFError, ConnectionError):
            self._abandon_worker()
            self._finish_error(job, "mock NDIF: the worker died while running the job")
            return
        kind, job_id, payload, elapsed = reply
        assert job_id == job.id
        meta = {"execution_time_s": round(elapsed, 4), "mock": True}
        if kind == "error":
            self.log.append(("error", job.id, payload))
            self._update(job, Status.ERROR, payload, meta=meta)
            job.done.set()
            return

        if failure.kind == "result":  # the job ran; the answer sent is someone else's bytes
            payload = failure.payload
            if job.compress:
                import zstandard

                payload = zstandard.ZstdCompressor(level=6).compress(payload)
        job.result = payload
        session = self._sessions.get(job.session_id) if job.session_id else None
        if session is not None and len(payload) <= self.inline_limit:
            data: Any = payload
        else:
            data = f"{self.url}/result/{job.id}"
        self._update(job, Status.COMPLETED, "Your job has been completed.", data=data, meta=meta)
        job.done.set()

    def _hold(self, failure: Failure, seconds: float | None) -> None:
        """Sleep up to ``seconds`` (default: the job deadline), less if released or stopping."""
        end = time.time() + (self.job_timeout_s if seconds is None else seconds)
        while time.time() < end and not failure.released.is_set() and not self._stopping.is_set():
            failure.released.wait(0.05)


class _Handler(BaseHTTPRequestHandler):
    mock: MockNDIF  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "MockNDIF/0.1"
    timeout = 30  # socket timeout for one request's reads

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # -- plumbing -------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (a download nsteer gave up on): nothing to answer
        self.close_connection = True

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _drop(self) -> None:
        """Cut the connection without a response (as a crashed proxy would)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- routes ---------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        mock = self.mock
        path = self.path.split("?", 1)[0]
        failure = mock.failure
        if path == "/subscribe":
            return self._subscribe()
        if path.startswith("/response/"):
            if failure.kind == "drop" and failure.phase == "poll":
                return self._drop()
            job = mock._jobs.get(path.rsplit("/", 1)[1])
            if job is None or job.latest is None:
                return self._json(404, {"detail": "Response not found."})
            return self._send(200, job.latest.model_dump_json().encode())
        if path.startswith("/result/"):
            if failure.kind == "drop" and failure.phase == "download":
                return self._drop()
            job = mock._jobs.get(path.rsplit("/", 1)[1])
            if job is None or job.result is None:
                return self._json(404, {"detail": "Result not found."})
            return self._send(200, job.result, "application/octet-stream")
        if path == "/ping":
            return self._json(200, "pong")
        if path == "/status":
            return self._json(200, {"deployments": self._deployments()})
        if path == "/env":
            info = mock.worker_info or {}
            return self._json(
                200,
                {
                    "python_version": info.get("python", ""),
                    "packages": {
                        "nnsight": info.get("nnsight", ""),
                        "torch": info.get("torch", ""),
                        "transformers": info.get("transformers", ""),
                    },
                },
            )
        if path == "/whoami":
            key = self.headers.get("ndif-api-key", "")
            email = "mock@ndif.local" if key in mock.api_keys else None
            return self._json(200, {"email": email, "tags": []})
        return self._json(404, {"detail": "Not Found"})

    def _deployments(self) -> dict:
        out = {}
        for repo_id in sorted(self.mock.deployed):
            key = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
                {"repo_id": repo_id, "revision": None, "task": "text-generation"}
            )
            out[key] = {
                "model_key": key,
                "repo_id": repo_id,
                "task": "text-generation",
                "revision": "main",
                "deployment_level": "HOT",
                "application_state": "RUNNING",
            }
        return out

    def do_POST(self) -> None:  # noqa: N802
        mock = self.mock
        path = self.path.split("?", 1)[0]
        if path != "/request":
            return self._json(404, {"detail": "Not Found"})
        failure = mock.failure
        body = self._body()

        if failure.kind == "drop" and failure.phase == "post":
            mock.log.append(("drop", path, "connection closed before a response"))
            return self._drop()
        if failure.kind == "hang":
            mock.log.append(("hang", path, "holding the request unanswered"))
            mock._hold(failure, failure.hold_s)
            return self._drop()
        if failure.kind == "http":
            return self._json(failure.status, {"detail": failure.detail or "Service Unavailable"})
        key = self.headers.get("ndif-api-key", "")
        if failure.kind == "auth" or key not in mock.api_keys:
            mock.log.append(("auth", path, "refused the API key"))
            return self._json(
                failure.status if failure.kind == "auth" else 401, {"detail": failure.detail or INVALID_KEY_DETAIL}
            )

        try:
            metadata, blob = self._multipart(body)
            request = json.loads(metadata)
            model_key = request["model_key"]
        except Exception as error:  # noqa: BLE001
            return self._json(400, {"detail": f"Malformed request: {error}"})
        repo_id = None
        try:
            repo_id = json.loads(model_key.split(":", 1)[1]).get("repo_id")
        except Exception:  # noqa: BLE001 - an unparseable key is just not deployed
            pass

        job = Job(
            id=uuid.uuid4().hex,
            model_key=model_key,
            repo_id=repo_id,
            env=request.get("env") or {},
            compress=bool(request.get("compress")),
            blob=blob,
            session_id=request.get("session_id") or "",
            failure=failure,
        )
        mock._jobs[job.id] = job
        received = ResponseModel(
            id=job.id,
            status=Status.RECEIVED,
            description="Your job has been received and is waiting to be queued.",
        )
        job.latest = received
        self._send(200, received.model_dump_json().encode())
        mock._queue.put(job)

    def _multipart(self, body: bytes) -> tuple[str, bytes]:
        content_type = self.headers.get("Content-Type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, bytes] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True)
        return fields["data"].decode(), fields["blob"]

    # -- websocket ------------------------------------------------------------

    def _subscribe(self) -> None:
        mock = self.mock
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            return self._json(400, {"detail": "expected a websocket upgrade"})
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

        sock = self.connection
        sock.settimeout(None)
        session = _Session()
        mock._sessions[session.id] = session
        # A session lives at most as long as a job may, plus slack.
        deadline = time.time() + mock.job_timeout_s + 30
        try:
            sock.sendall(_ws_frame(json.dumps({"session_id": session.id}).encode(), 0x1))
            while not mock._stopping.is_set() and time.time() < deadline:
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    opcode, payload = _ws_read_frame(sock)
                    if opcode == 0x8:  # close: echo it and finish
                        sock.sendall(_ws_frame(payload[:2], 0x8))
                        return
                    if opcode == 0x9:  # ping
                        sock.sendall(_ws_frame(payload, 0xA))
                    continue
                try:
                    kind, payload = session.outbox.get_nowait()
                except queue.Empty:
                    continue
                if kind == "text":
                    sock.sendall(_ws_frame(payload.encode(), 0x1))
                elif kind == "binary":
                    sock.sendall(_ws_frame(payload, 0x2))
                elif kind == "drop":
                    mock.log.append(("drop", "/subscribe", "websocket cut mid-job"))
                    sock.shutdown(socket.SHUT_RDWR)
                    return
                elif kind == "close":
                    sock.sendall(_ws_frame(struct.pack("!H", 1001), 0x8))
                    return
        except (ConnectionError, OSError):
            return
        finally:
            mock._sessions.pop(session.id, None)
