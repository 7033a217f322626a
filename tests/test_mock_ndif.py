"""The mock NDIF server against nnsight's real remote client (plain nnsight, no nsteer).

Parity (remote through the mock == local on the same tiny model, floats to a stated tolerance: the mock's worker
is another process, perhaps at another thread count), each failure
mode and the exception the client raises for it, and the isolation of the
server's worker (code the worker cannot import fails there).
"""

from __future__ import annotations

import sys

import httpx
import pytest
import torch
import websocket
from nnsight.intervention.backends.remote import RemoteError

try:  # tests/ on sys.path (no tests/__init__.py): pytest's default prepend mode
    from mock_ndif.fixture import deadline_backend, mock_ndif, mock_ndif_server, wait_for_result  # noqa: F401
    from mock_ndif.server import INVALID_KEY_DETAIL, NOT_DEPLOYED_DETAIL, REPO_ROOT
    from mock_ndif.tiny_models import UNDEPLOYED_MODEL
except ImportError:  # the repository root on sys.path instead
    from tests.mock_ndif.fixture import deadline_backend, mock_ndif, mock_ndif_server, wait_for_result  # noqa: F401
    from tests.mock_ndif.server import INVALID_KEY_DETAIL, NOT_DEPLOYED_DETAIL, REPO_ROOT
    from tests.mock_ndif.tiny_models import UNDEPLOYED_MODEL

PROMPT = "The Eiffel Tower is in"


def assert_same_computation(remote_value: torch.Tensor, local_value: torch.Tensor) -> None:
    """A value computed by the mock's worker (another process, perhaps another thread count) against the same value
    computed here: float kernels may round differently in the last bits there, so they agree to 1e-5 (the tiny
    model's activations are of unit scale; a real difference, e.g. a shift by 1.5 left out, is orders larger)."""
    assert remote_value.shape == local_value.shape and remote_value.dtype == local_value.dtype
    torch.testing.assert_close(remote_value, local_value, rtol=1e-5, atol=1e-5)


def _local_layer(local, prompt=PROMPT, layer=1):
    with local.trace(prompt):
        out = local.model.layers[layer].output.save()
    return out


def shift(hidden, amount):
    """A helper defined in this (local, non-installed) module: nnsight ships it by value."""
    return hidden + amount


# --------------------------------------------------------------------- parity


def test_worker_is_isolated(mock_ndif):
    info = mock_ndif.server.worker_info
    assert info["nsteer_importable"] is False
    root = str(REPO_ROOT)
    assert all(not entry.startswith(root) or "site-packages" in entry for entry in info["sys_path"])


def test_trace_layer_output_blocking_matches_local(mock_ndif):
    remote = mock_ndif.remote_model()
    assert not remote.dispatched  # meta model, named by its Hub id
    assert '"repo_id": "mock-ndif/tiny-llama"' in remote.to_model_key()

    with remote.trace(PROMPT, remote=True):
        hidden = remote.model.layers[1].output.save()

    expected = _local_layer(mock_ndif.local_model())
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (1, len(PROMPT.encode()), 64)
    assert_same_computation(hidden, expected)


def test_trace_non_blocking_job_id_and_poll(mock_ndif):
    remote = mock_ndif.remote_model()
    with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
        # Unused here but needed: nnsight keys the saved values by variable name, so this makes result["hidden"].
        hidden = remote.model.layers[1].output.save()  # noqa: F841
    backend = tracer.backend
    assert backend.job_id  # submitted; nothing is pushed into this frame
    result = wait_for_result(backend)
    assert set(result) == {"hidden"}

    # A fresh poll-only backend collects the same job later, by id alone.
    from nnsight.intervention.backends.remote import RemoteBackend

    again = RemoteBackend(remote.to_model_key(), blocking=False, job_id=backend.job_id)
    collected = again()
    assert torch.equal(collected["hidden"], result["hidden"])  # one result, downloaded twice: the same bytes
    assert_same_computation(result["hidden"], _local_layer(mock_ndif.local_model()))


def test_session_and_shipped_helper(mock_ndif):
    remote = mock_ndif.remote_model()
    local = mock_ndif.local_model()
    with remote.session(remote=True):
        with remote.trace(PROMPT):
            first = remote.model.layers[0].output.save()
        with remote.trace("Hello"):
            second = shift(remote.model.layers[1].output, 1.5).save()
    assert_same_computation(first, _local_layer(local, layer=0))
    assert_same_computation(second, _local_layer(local, "Hello") + 1.5)


@pytest.mark.filterwarnings("ignore:.*was never reached")
def test_generate_with_edit_every_step_matches_local(mock_ndif):
    def run(model, remote):
        with model.generate(max_new_tokens=6, do_sample=False, remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                for _step in tracer.all():
                    model.model.layers[1].output[:] += 3.0
            with tracer.invoke():
                tokens = tracer.result.save()
        return tokens

    remote_tokens = run(mock_ndif.remote_model(), True)
    local = mock_ndif.local_model()
    local_tokens = run(local, False)
    assert torch.equal(remote_tokens, local_tokens)  # greedy ids: the chosen token leads by 7.8e-2 or more here
    with local.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        plain = tracer.result.save()
    assert not torch.equal(plain, local_tokens)  # the edit did something


def test_published_model(mock_ndif):
    # A suite can host its own model under a Hub-style id (here a GPT-2 layout).
    try:
        from mock_ndif.tiny_models import build_hf_model, make_tokenizer
    except ImportError:
        from tests.mock_ndif.tiny_models import build_hf_model, make_tokenizer

    repo_id = mock_ndif.publish("someone/published-gpt2", build_hf_model("mock-ndif/tiny-gpt2"), make_tokenizer())
    remote = mock_ndif.remote_model(repo_id)
    with remote.trace(PROMPT, remote=True):
        hidden = remote.transformer.h[0].output.save()
    local = mock_ndif.local_model(repo_id)
    with local.trace(PROMPT):
        expected = local.transformer.h[0].output.save()
    assert_same_computation(hidden, expected)


# --------------------------------------------------------------------- failures


@pytest.mark.parametrize("blocking", [True, False])
def test_bad_api_key_is_refused(mock_ndif, blocking):
    remote = mock_ndif.remote_model()
    backend = mock_ndif.backend(remote, blocking=blocking, api_key="wrong-key")
    with pytest.raises(RemoteError, match="Failed to send request: Missing or invalid API key"):
        with remote.trace(PROMPT, backend=backend):
            remote.model.layers[1].output.save()
    assert INVALID_KEY_DETAIL.startswith("Missing or invalid API key")


def test_forbidden_status_is_refused(mock_ndif):
    mock_ndif.fail("auth", status=403, detail="Forbidden: key revoked.")
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="Failed to send request: Forbidden: key revoked."):
        with remote.trace(PROMPT, remote=True):
            remote.model.layers[1].output.save()


@pytest.mark.parametrize("blocking", [True, False])
def test_undeployed_model(mock_ndif, blocking):
    remote = mock_ndif.remote_model(UNDEPLOYED_MODEL)
    with pytest.raises(RemoteError) as caught:
        with remote.trace(PROMPT, remote=True, blocking=blocking) as tracer:
            remote.model.layers[1].output.save()
        wait_for_result(tracer.backend)  # non-blocking: the error arrives at a poll
    assert str(caught.value) == NOT_DEPLOYED_DETAIL


def test_unknown_model_key(mock_ndif):
    # Any id the server does not run, however the client named it.
    from nnsight.intervention.backends.remote import RemoteBackend

    remote = mock_ndif.remote_model()
    key = remote.to_model_key().replace("mock-ndif/tiny-llama", "nobody/no-such-model")
    with pytest.raises(RemoteError, match="Model is not dedicated"):
        with remote.trace(PROMPT, backend=RemoteBackend(key)):
            remote.model.layers[1].output.save()


def test_offline_model(mock_ndif):
    mock_ndif.fail("offline")
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="Model is not dedicated"):
        with remote.trace(PROMPT, remote=True):
            remote.model.layers[1].output.save()


def test_never_answers_non_blocking_client_deadline(mock_ndif):
    mock_ndif.fail("stall")
    remote = mock_ndif.remote_model()
    with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
        remote.model.layers[1].output.save()
    with pytest.raises(TimeoutError, match="did not finish within"):
        wait_for_result(tracer.backend, timeout_s=1.0)
    assert tracer.backend.status.value == "RUNNING"


def test_never_answers_blocking_client_deadline(mock_ndif):
    # The blocking client waits on the websocket with no deadline of its own (it
    # swallows socket timeouts); deadline_backend raises from the status display.
    mock_ndif.fail("stall")
    remote = mock_ndif.remote_model()
    with pytest.raises(TimeoutError, match="did not finish within 1 s"):
        with remote.trace(PROMPT, backend=deadline_backend(remote, 1.0)):
            remote.model.layers[1].output.save()


def test_request_never_answered_http_timeout(mock_ndif, monkeypatch):
    import nnsight.intervention.backends.remote as remote_module

    mock_ndif.fail("hang", hold_s=5)
    monkeypatch.setattr(remote_module, "_READ_TIMEOUT", 0.5)
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="Failed to send request: timed out") as caught:
        with remote.trace(PROMPT, remote=True, blocking=False):
            remote.model.layers[1].output.save()
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


def test_server_side_execution_error(mock_ndif):
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="has attribute '7'") as caught:
        with remote.trace(PROMPT, remote=True):
            remote.model.layers[7].output.save()  # 3 layers; only the server finds out
    assert str(caught.value).startswith("Traceback")
    assert "AttributeError" in str(caught.value)

    mock_ndif.fail("exec_error")
    with pytest.raises(RemoteError, match="injected server-side failure"):
        with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
            remote.model.layers[1].output.save()
        wait_for_result(tracer.backend)


def test_dropped_connection_on_submit(mock_ndif):
    mock_ndif.fail("drop", phase="post")
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="Failed to send request: Server disconnected") as caught:
        with remote.trace(PROMPT, remote=True):
            remote.model.layers[1].output.save()
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


def test_dropped_websocket_mid_job(mock_ndif):
    mock_ndif.fail("drop", phase="ws")
    remote = mock_ndif.remote_model()
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        with remote.trace(PROMPT, remote=True):
            remote.model.layers[1].output.save()


@pytest.mark.parametrize("phase", ["poll", "download"])
def test_dropped_connection_while_collecting(mock_ndif, phase):
    mock_ndif.fail("drop", phase=phase)
    remote = mock_ndif.remote_model()
    with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
        remote.model.layers[1].output.save()
    mock_ndif.server.wait_idle()
    with pytest.raises(httpx.RemoteProtocolError):  # not wrapped in RemoteError
        wait_for_result(tracer.backend)


def test_blocking_download_by_url_uncompressed(mock_ndif, monkeypatch):
    from nnsight import CONFIG

    # Results over the inline limit come as a url to download, not on the socket;
    # with compression off, neither the payload nor the result is zstd'd.
    monkeypatch.setattr(CONFIG.API, "COMPRESS", False)
    mock_ndif.server.inline_limit = 0
    remote = mock_ndif.remote_model()
    with remote.trace(PROMPT, remote=True):
        hidden = remote.model.layers[1].output.save()
    assert_same_computation(hidden, _local_layer(mock_ndif.local_model()))


# --------------------------------------------------------------------- isolation


def test_client_only_module_fails_on_server(mock_ndif, tmp_path, monkeypatch):
    from nnsight.ndif import pull_env

    # nnsight scans sys.path once for local (non-installed) modules and ships those
    # by value; a module that is not among them is pickled by reference and the
    # server must import it -- it cannot.
    pull_env()
    (tmp_path / "client_only_helpers.py").write_text("def double(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "client_only_helpers", raising=False)
    from client_only_helpers import double

    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="No module named 'client_only_helpers'"):
        with remote.trace(PROMPT, remote=True):
            doubled = double(remote.model.layers[1].output).save()  # noqa: F841


def test_import_outside_whitelist_fails_on_server(mock_ndif):
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="Module json is not whitelisted"):
        with remote.trace(PROMPT, remote=True):
            import json  # noqa: F401

            remote.model.layers[1].output.save()


def test_job_deadline_kills_runaway_job(mock_ndif):
    mock_ndif.server.job_timeout_s = 2.0
    remote = mock_ndif.remote_model()
    with pytest.raises(RemoteError, match="deadline"):
        with remote.trace(PROMPT, remote=True):
            import time

            time.sleep(30)
            remote.model.layers[1].output.save()
