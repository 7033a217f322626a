"""Opening models: device and dtype settings checked before anything loads, dtype auto, weights placed as they load,
fingerprints that do not depend on the dtype, and TF32 switched on only inside nsteer's own calls on CUDA."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_hf_model, tiny_tokenizer

from nsteer import models
from nsteer.errors import ModelError
from nsteer.models import float32_weights_fingerprint, open_model, resolve_device, resolve_dtype, wrap_model
from nsteer.vectors import VectorMetadata, check_compatible, same_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has ``count`` CUDA GPUs of compute capability ``capability`` (no GPU code runs)."""

    def install(count: int = 1, capability: tuple[int, int] = (9, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)

    return install


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny random Llama saved in float32 (config, weights, tokenizer), as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("saved-llama")
    tiny_hf_model("llama", seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- devices and dtypes --------------------------------------------------------------------------------------------


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cuda", ("device 'cuda'", "no CUDA GPU", "device: cpu")),
        ("cuda:1", ("no CUDA GPU", "device: cpu")),
        ("mps", ("Apple GPU", "float64", "device: cpu")),
        ("gpu", ("Unknown device 'gpu'", "cpu, cuda, cuda:N or auto")),
        ("cuda:x", ("Unknown device",)),
        ("", ("Unknown device",)),
    ],
)
def test_devices_this_machine_cannot_use_are_refused_with_what_to_do(monkeypatch, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError) as error:
        resolve_device(device)
    for part in expected:
        assert part in str(error.value), (part, str(error.value))


def test_a_gpu_index_beyond_the_machines_gpus_is_refused(fake_gpus):
    fake_gpus(count=2)
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == "cuda"
    with pytest.raises(ModelError, match=r"has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_dtype_auto_is_bfloat16_only_on_gpus_with_native_bfloat16(fake_gpus):
    fake_gpus(capability=(8, 0))
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32
    fake_gpus(capability=(7, 5))  # e.g. a T4: bfloat16 would be emulated
    assert resolve_dtype("auto", "cuda") is torch.float32


def test_device_and_dtype_are_checked_before_any_file_is_read(monkeypatch, tmp_path):
    """A bad device or dtype is named even when the model does not exist: nothing was loaded first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        open_model(missing, device="cuda")
    with pytest.raises(ModelError, match="dtype 'float64' is not supported; use one of auto, float32"):
        open_model(missing, dtype="float64")


def test_gpu_weights_are_placed_as_they_load(fake_gpus, monkeypatch, saved_llama):
    """On a GPU, from_pretrained gets the device (weights go straight there) and auto's bfloat16; no .to() after."""
    from transformers import AutoModelForCausalLM

    fake_gpus(capability=(9, 0))
    calls = []

    def fake_from_pretrained(location, **kwargs):
        calls.append(kwargs)
        raise OSError("stop here: only the arguments matter")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ModelError, match="stop here"):
        open_model(str(saved_llama), device="cuda:0")
    assert calls[-1]["device_map"] == "cuda:0" and calls[-1]["dtype"] is torch.bfloat16
    with pytest.raises(ModelError):
        open_model(str(saved_llama), device="cpu")
    assert "device_map" not in calls[-1] and calls[-1]["dtype"] is torch.float32


# --- fingerprints across dtypes ------------------------------------------------------------------------------------


def _metadata(handle, **changes) -> VectorMetadata:
    base = VectorMetadata(
        nsteer_version="0",
        model_id=handle.model_id,
        config_hash=handle.config_hash,
        weights_fingerprint=handle.weights_fingerprint,
        architecture=handle.architecture,
        hidden_size=handle.hidden_size,
        n_layers=handle.n_layers,
        instruction_id="lowercase",
    )
    return dataclasses.replace(base, **changes)


def test_the_same_weights_in_another_dtype_are_the_same_model(saved_llama):
    fp32 = open_model(str(saved_llama), dtype="float32")
    bf16 = open_model(str(saved_llama), dtype="bfloat16")
    assert fp32.dtype is torch.float32 and bf16.dtype is torch.bfloat16
    assert fp32.weights_fingerprint == bf16.weights_fingerprint
    assert fp32.weights_fingerprint.startswith(models.FINGERPRINT_PREFIX)
    made_in_fp32 = _metadata(fp32)
    assert same_model(made_in_fp32, bf16)
    # The answers differ by dtype, so resumable checkpoints do not mix them.
    assert fp32.run_identity != bf16.run_identity


def test_other_weights_differ_in_every_dtype(tiny):
    for dtype in (torch.float32, torch.bfloat16):
        first, other = tiny("llama", dtype=dtype), tiny("llama", seed=1, dtype=dtype)
        assert first.weights_fingerprint != other.weights_fingerprint
        assert not same_model(_metadata(first), wrap_model(other.hf_model, other.tokenizer, model_id=first.model_id))


def test_older_files_hold_a_float32_fingerprint_that_float32_models_still_check(saved_llama, tiny):
    fp32 = open_model(str(saved_llama), dtype="float32")
    bf16 = open_model(str(saved_llama), dtype="bfloat16")
    legacy = float32_weights_fingerprint(fp32.hf_model)
    assert legacy and not legacy.startswith(models.FINGERPRINT_PREFIX)
    assert float32_weights_fingerprint(bf16.hf_model) == ""  # only float32 weights reproduce it
    old_file = _metadata(fp32, weights_fingerprint=legacy)
    assert same_model(old_file, fp32)
    assert same_model(old_file, bf16)  # cannot compare weights: id and config agree
    assert not same_model(_metadata(fp32, weights_fingerprint="0123456789abcdef"), fp32)
    assert not same_model(dataclasses.replace(old_file, model_id="elsewhere"), bf16)


def test_a_vector_from_float32_applies_to_bfloat16_without_transfer(saved_llama):
    from nsteer.vectors import SteeringVector

    fp32 = open_model(str(saved_llama), dtype="float32")
    bf16 = open_model(str(saved_llama), dtype="bfloat16")
    n, h = fp32.n_layers, fp32.hidden_size
    vector = SteeringVector(torch.zeros(n, h), torch.zeros(n), torch.zeros(n), _metadata(fp32))
    check_compatible(vector, bf16)  # no VectorFileError


# --- TF32 ----------------------------------------------------------------------------------------------------------


def test_tf32_is_switched_on_only_inside_and_put_back(monkeypatch):
    matmul = torch.backends.cuda.matmul
    cuda_handle = SimpleNamespace(tf32=True, remote=False, device=torch.device("cuda"))
    before = matmul.allow_tf32
    with models.tf32_matmuls(cuda_handle):
        assert matmul.allow_tf32 is True
    assert matmul.allow_tf32 == before
    for handle in (
        SimpleNamespace(tf32=False, remote=False, device=torch.device("cuda")),
        SimpleNamespace(tf32=True, remote=False, device=torch.device("cpu")),
    ):
        with models.tf32_matmuls(handle):
            assert matmul.allow_tf32 == before


def test_tf32_respects_a_process_on_torchs_newer_precision_switch():
    """torch refuses to mix its old and new TF32 switches; a process on the new one keeps working (own process)."""
    code = textwrap.dedent(
        """
        import torch
        from types import SimpleNamespace
        from nsteer.models import tf32_matmuls
        matmul = torch.backends.cuda.matmul
        matmul.fp32_precision = "ieee"
        with tf32_matmuls(SimpleNamespace(tf32=True, remote=False, device=torch.device("cuda"))):
            inside = matmul.fp32_precision
        print(inside, matmul.fp32_precision)
        """
    )
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the older TF32 switch")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["tf32", "ieee"]


# --- on a real GPU -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_on_a_gpu_auto_opens_in_bfloat16_on_the_device(saved_llama):
    handle = open_model(str(saved_llama), device="cuda")
    assert handle.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float32
    assert handle.dtype is expected
    assert all(parameter.device.type == "cuda" for parameter in handle.hf_model.parameters())
    assert handle.weights_fingerprint == open_model(str(saved_llama)).weights_fingerprint


@pytest.mark.cuda
@needs_cuda
def test_on_a_gpu_nsteers_own_calls_run_float32_products_in_tf32_and_put_the_switch_back():
    from nsteer.generate import GenerationConfig, generate_tokens

    model = tiny_hf_model("llama").to("cuda")
    handle = wrap_model(model, tiny_tokenizer(), model_id="tiny-llama-tf32")  # tf32=True, the default
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.matmul.allow_tf32))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        generate_tokens(handle, ["Hi"], config=GenerationConfig(max_new_tokens=3))
        model(torch.tensor([[1, 2, 3]], device="cuda"))  # outside nsteer: the process's own setting
    finally:
        hook.remove()
    assert seen[:-1] and all(seen[:-1]) and seen[-1] == before
    assert torch.backends.cuda.matmul.allow_tf32 == before
