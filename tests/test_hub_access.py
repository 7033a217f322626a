"""A Hub id with no reachable Hub fails at once (no ~45 s of retries), or loads from the cache when it is there."""

from __future__ import annotations

import socket
import time

import pytest

import nsteer.models
from nsteer.errors import ModelError


@pytest.fixture()
def online_mode_without_network(monkeypatch):
    """Offline mode off (the suite sets it), no proxy, and every connection refused like a machine without network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in nsteer.models._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_an_unreachable_hub_fails_at_once_without_loading(monkeypatch, online_mode_without_network):
    def loader(*args, **kwargs):
        raise AssertionError("transformers was asked to load a model the Hub cannot provide")

    monkeypatch.setattr(nsteer.models, "_from_pretrained", loader)
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        nsteer.models.open_model("some-org/some-model")
    assert time.monotonic() - started < 10  # a bound on a hang, not a speed test
    message = str(error.value)
    assert "'some-org/some-model' is a Hub id" in message and "cannot be reached" in message
    assert "Network is unreachable" in message and "not in the local cache" in message
    assert online_mode_without_network == [("huggingface.co", 443)]


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(monkeypatch, online_mode_without_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert nsteer.models.hub_access("some-org/some-model") == {"local_files_only": True}


def test_no_probe_in_offline_mode_or_behind_a_proxy(monkeypatch, online_mode_without_network):
    from huggingface_hub import constants

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert nsteer.models.hub_access("some-org/some-model") == {}
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert nsteer.models.hub_access("some-org/some-model") == {}
    assert online_mode_without_network == []


def test_a_local_model_folder_is_never_probed(monkeypatch, online_mode_without_network, tmp_path):
    calls = []
    monkeypatch.setattr(nsteer.models, "_from_pretrained", lambda *a, **k: calls.append(a) or (None, None))
    (tmp_path / "config.json").write_text("{}")
    nsteer.models._load_local(str(tmp_path), None, "cpu", None)
    assert calls and online_mode_without_network == []


def test_a_remote_model_without_network_says_it_cannot_reach_the_hub(monkeypatch, online_mode_without_network):
    """Opening an NDIF model reads its config and tokenizer from the Hub: with no network that was minutes of
    retries and a traceback (or a message about file permissions); now it is the "cannot reach" of an NDIF host."""
    from nnsight import CONFIG

    from nsteer.errors import RemoteError

    monkeypatch.setattr(CONFIG.API, "APIKEY", "a-key")
    started = time.monotonic()
    with pytest.raises(RemoteError) as error:
        nsteer.models.open_model("some-org/some-model", remote=True)
    assert time.monotonic() - started < 10  # a bound on a hang, not a speed test
    message = " ".join(str(error.value).split())
    assert "Could not reach the Hugging Face Hub at https://huggingface.co" in message
    assert "'some-org/some-model'" in message and "not in the local cache" in message and "network" in message
