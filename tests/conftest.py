"""Shared fixtures: tiny models cached per session, and the independent Hugging Face reference for activations."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The suite never writes the user's cache: the de-quantized embedded model goes to a folder of this session (the
# first open writes it, later opens, in this process or in CLI subprocesses, read it), removed at exit.
_CACHE = tempfile.mkdtemp(prefix="nsteer-test-cache-")
os.environ["NSTEER_CACHE_DIR"] = _CACHE
os.environ.pop("NSTEER_NO_CACHE", None)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Tiny models are dominated by per-op overhead; on a small shared machine torch's intra-op thread pool makes each
# step ~20x slower (spinning workers fight other processes). One thread keeps the suite fast; override with
# NSTEER_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("NSTEER_TEST_THREADS", "1")))

# tests/ has no __init__.py, so pytest puts it on sys.path and `tiny` imports as a top-level module.
# The loopback mock NDIF server (tests/mock_ndif): a session server and a per-test handle pointing nnsight at it.
from mock_ndif.fixture import mock_ndif, mock_ndif_server  # noqa: E402, F401
from tiny import tiny_handle, tiny_tokenizer  # noqa: E402

_HANDLES: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny ChatML tokenizer (pad = eos = <|im_end|>)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    """A factory of tiny model handles, built once per (family, seed, dtype, device) for the whole session.

    Handles are only read by the tests (hooks are always removed), so sharing them is safe.
    """

    def make(
        family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs
    ):
        key = (family, seed, dtype, device, tuple(sorted(kwargs.items())))
        if key not in _HANDLES:
            _HANDLES[key] = tiny_handle(family, seed=seed, dtype=dtype, device=device, **kwargs)
        return _HANDLES[key]

    return make


def reference_left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding written out independently of nsteer.extract.left_pad."""
    width = max(len(s) for s in sequences)
    rows = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    masks = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def hf_block_outputs_last_token(
    hf_model, layers_path: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reference ``[n_layers, B, H]`` (float64): each block's output at the last position, straight from Hugging Face.

    Layers 0..L-2 come from ``output_hidden_states`` (``hidden_states[l + 1]``); the last entry of ``hidden_states``
    is taken after the final norm, so the last block's output comes from a plain forward hook on that block.
    Position ids follow the attention mask, as ``generate`` computes them for left-padded rows.
    """
    blocks = hf_model.get_submodule(layers_path)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured["last"] = hidden.detach().clone()

    device = next(hf_model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    handle = blocks[len(blocks) - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True
            )
    finally:
        handle.remove()
    n_layers = len(blocks)
    assert len(out.hidden_states) == n_layers + 1
    states = [out.hidden_states[layer + 1][:, -1] for layer in range(n_layers - 1)] + [captured["last"][:, -1]]
    return torch.stack(states).to("cpu", torch.float64)


def nsteer_last_token_states(handle, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[n_layers, B, H]`` float64: each row's last-token block outputs as nsteer's extraction reads them, inside the
    same left-padded batch (the with-instruction sum of ``last_token_sums`` over a batch whose only with-row is that
    row, moved to the front)."""
    from nsteer.extract import last_token_sums

    rows = []
    for row in range(input_ids.shape[0]):
        order = [row, *(other for other in range(input_ids.shape[0]) if other != row)]
        rows.append(last_token_sums(handle, [(input_ids[order], attention_mask[order], 1)])[0])
    return torch.stack(rows, dim=1)


@pytest.fixture(scope="session")
def nsteer_states() -> Callable[..., torch.Tensor]:
    """nsteer's reader of block outputs (see ``nsteer_last_token_states``)."""
    return nsteer_last_token_states


@pytest.fixture(scope="session")
def hf_last_token_states() -> Callable[..., torch.Tensor]:
    """The reference reader of block outputs (see ``hf_block_outputs_last_token``)."""
    return hf_block_outputs_last_token
