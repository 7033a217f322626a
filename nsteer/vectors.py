"""SteeringVector, its safetensors file with metadata, and the check that a vector fits a model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nsteer.errors import NsteerError, VectorFileError, require
from nsteer.fileio import MIB, atomic_write_bytes, folder_lock, parse_json, require_file
from nsteer.models import FINGERPRINT_PREFIX, ModelHandle, float32_weights_fingerprint
from nsteer.records import read_record, record_dict
from nsteer.searched import (
    SearchedSetting,
    check_setting,
    read_settings_by_instruction,
    setting_reader,
    setting_writer,
    settings_dict,
)

FORMAT_NAME = "nsteer.vector"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
# How files of an older format version are read: UPGRADES[n] turns version n's metadata into version n + 1's. A new
# metadata field needs none when its default is what older files mean; otherwise bump FORMAT_VERSION and add one.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
TENSOR_NAMES = ("directions", "mean_projections", "norms")
UNIT_TOLERANCE = 1e-2  # a stored direction may be off unit length by rounding (bfloat16: ~1e-3), not more


@dataclass(frozen=True)
class VectorMetadata:
    """Everything needed to know where a vector came from and whether it fits a model."""

    nsteer_version: str
    model_id: str
    config_hash: str
    weights_fingerprint: str
    architecture: str
    hidden_size: int
    n_layers: int
    instruction_id: str
    category: str = ""
    description: str = ""
    check_id: str = ""
    check_kwargs: Mapping[str, Any] = field(default_factory=dict)
    phrasings: tuple[str, ...] = ()
    prompt_set_hash: str = ""
    n_pairs: int = 0
    chat_template_hash: str = ""
    seed: int = 0
    read_site: str = "block_output"
    token_position: str = "last_prompt_token"
    # Filled in by `nsteer search` for the vector's own instruction; None means unsearched.
    chosen: SearchedSetting | None = field(default=None, metadata={"read": setting_reader, "write": setting_writer})
    # Settings searched for OTHER instructions that borrow this vector, by instruction (word exclusion searches the
    # include:<word> vector with a negative weight): kept apart so one use never takes another's layer or weight.
    chosen_for: Mapping[str, SearchedSetting] = field(
        default_factory=dict, metadata={"read": read_settings_by_instruction, "write": settings_dict}
    )
    # Non-empty for a vector read from another format (e.g. "llama.cpp control vector concise.gguf"): it has
    # directions and scales but no mean projections, so `set` edits are refused (nsteer.interop).
    imported_from: str = ""

    def to_json(self) -> str:
        """Serialize to a JSON string for the safetensors header (``chosen_for`` only when used, so files without
        borrowed searches keep their bytes)."""
        always = [item.name for item in dataclasses.fields(self) if item.name != "chosen_for"]
        return json.dumps(record_dict(self, always=always), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: Path, version: int = FORMAT_VERSION) -> VectorMetadata:
        """Parse the header JSON of a format ``version`` file: missing fields are refused, every field is
        type-checked, unknown ones ignored."""
        try:
            data = parse_json(text)
        except ValueError as error:
            raise VectorFileError(f"{path}: the nsteer metadata is not valid JSON ({error.msg}).") from None
        if not isinstance(data, dict):
            raise VectorFileError(f"{path}: the nsteer metadata is not a JSON object; recompute the vector.")
        for older in range(version, FORMAT_VERSION):
            data = UPGRADES[older](data)
        required = {
            item.name
            for item in dataclasses.fields(cls)
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise VectorFileError(
                f"{path}: the metadata lacks {', '.join(missing)}; recompute the vector with `nsteer compute`."
            )
        n_layers = data.get("n_layers")
        return read_record(
            cls,
            data,
            where=str(path),
            error=VectorFileError,
            hint="Recompute the vector with `nsteer compute` (a searched setting: rerun `nsteer search`).",
            context={"n_layers": n_layers if isinstance(n_layers, int) and not isinstance(n_layers, bool) else None},
            unknown="ignore",
        )


@dataclass(frozen=True)
class SteeringVector:
    """Per-layer unit directions, mean projections of the with-instruction prompts, raw norms, and metadata."""

    directions: torch.Tensor  # [n_layers, H], unit rows
    mean_projections: torch.Tensor  # [n_layers]
    norms: torch.Tensor  # [n_layers]
    metadata: VectorMetadata

    @property
    def instruction_id(self) -> str:
        """The instruction this vector steers toward."""
        return self.metadata.instruction_id

    def choice(self, instruction: str | None = None) -> SearchedSetting | None:
        """The setting searched for ``instruction`` (default: the vector's own); None if none was searched."""
        if instruction is None or instruction == self.instruction_id:
            return self.metadata.chosen
        return self.metadata.chosen_for.get(instruction)

    def with_choice(self, chosen: SearchedSetting | None, instruction: str | None = None) -> SteeringVector:
        """A copy with the searched setting recorded for ``instruction`` (the one way a setting enters a vector).

        The vector's own instruction (the default) goes to ``chosen``; another instruction that borrows the vector
        goes to ``chosen_for[instruction]``, leaving the vector's own setting untouched.
        """
        if chosen is not None:
            where = f"the setting for '{instruction or self.instruction_id}'"
            check_setting(chosen, n_layers=self.metadata.n_layers, where=where)
        if instruction is None or instruction == self.instruction_id:
            metadata = dataclasses.replace(self.metadata, chosen=chosen)
        else:
            borrowed = {key: value for key, value in self.metadata.chosen_for.items() if key != instruction}
            if chosen is not None:
                borrowed[instruction] = chosen
            metadata = dataclasses.replace(self.metadata, chosen_for=dict(sorted(borrowed.items())))
        return dataclasses.replace(self, metadata=metadata)


def carry_choices(path: str | Path, vector: SteeringVector) -> SteeringVector:
    """``vector`` with the searched settings of the file at ``path`` (its own and its borrowers'), when that file holds
    a readable vector of the same instruction: recomputing a vector keeps what searches chose for it."""
    try:
        previous = load_vector(path)
    except NsteerError:  # no usable earlier file: nothing to keep
        return vector
    if previous.instruction_id != vector.instruction_id or previous.metadata.imported_from:
        return vector  # another instruction's file, or an import's setting (llama.cpp's scale, never searched)
    metadata = dataclasses.replace(
        vector.metadata, chosen=previous.metadata.chosen, chosen_for=previous.metadata.chosen_for
    )
    return dataclasses.replace(vector, metadata=metadata)


def identity(vector: SteeringVector) -> str:
    """What makes a vector file the same vector: its tensors and its metadata other than the searched settings."""
    digest = hashlib.sha256()
    for name in TENSOR_NAMES:
        digest.update(getattr(vector, name).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    bare = dataclasses.replace(vector.metadata, chosen=None, chosen_for={})
    digest.update(bare.to_json().encode())
    return digest.hexdigest()


def replace_vector(path: str | Path, vector: SteeringVector, *, keep_choices: bool = True) -> Path:
    """Save a freshly computed ``vector`` over ``path``, keeping (``keep_choices``) the searched settings the file
    holds at the moment of writing: read and write happen under the folder's lock, so a search that records its
    setting meanwhile is kept rather than overwritten with what the file held when the computation started."""
    path = Path(path)
    with folder_lock(path):
        if keep_choices and path.exists():
            vector = carry_choices(path, vector)
        return save_vector(vector, path)


def record_choice(
    path: str | Path, searched: SteeringVector, chosen: Any, instruction: str | None = None
) -> SteeringVector:
    """Write the setting ``chosen`` for ``instruction`` into the vector file at ``path``, provided it still holds the
    vector ``searched`` was run on; a file recomputed or replaced meanwhile is refused, never silently reverted.

    Settings other searches recorded meanwhile (for other instructions borrowing the vector) are kept: the file is read
    again under the folder's lock and only this one setting changes.
    """
    path = Path(path)
    with folder_lock(path):
        try:
            current = load_vector(path)
        except NsteerError as error:
            raise VectorFileError(
                f"{path} can no longer be read ({error}), so the searched setting was not written. "
                "Rerun `nsteer search` once the file is back."
            ) from None
        if identity(current) != identity(searched):
            raise VectorFileError(
                f"{path} changed while the search ran (recomputed or replaced), so the setting searched on the "
                "earlier vector was not written into it. Rerun `nsteer search` to search the vector the file holds now."
            )
        updated = current.with_choice(chosen, instruction)
        save_vector(updated, path)
        return updated


def save_vector(vector: SteeringVector, path: str | Path) -> Path:
    """Write ``vector`` to a safetensors file atomically and return its path."""
    from safetensors.torch import save

    require(vector, SteeringVector, "vector")
    problem = tensor_problem(*(getattr(vector, name).detach().to("cpu", torch.float32) for name in TENSOR_NAMES))
    if problem:  # a broken computation (or an NDIF result) never becomes a file later runs take as current
        raise VectorFileError(f"The vector '{vector.instruction_id}' cannot be saved: {problem}.")
    tensors = {
        "directions": vector.directions.detach().to("cpu", torch.float32).contiguous(),
        "mean_projections": vector.mean_projections.detach().to("cpu", torch.float32).contiguous(),
        "norms": vector.norms.detach().to("cpu", torch.float32).contiguous(),
    }
    path = Path(path)
    text = vector.metadata.to_json()
    try:  # never write a file that load_vector refuses (a searched setting built in code is not checked until read)
        VectorMetadata.from_json(text, path)
    except VectorFileError as error:
        raise VectorFileError(
            f"The vector '{vector.instruction_id}' cannot be saved: its metadata would not read back ({error})"
        ) from None
    payload = save(tensors, metadata={"format": FORMAT, "nsteer": text})
    atomic_write_bytes(path, canonical_safetensors(payload))
    return path


def canonical_safetensors(payload: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal vectors give equal bytes.

    safetensors writes the header from a hash map, whose key order changes from run to run; data offsets are relative
    to the end of the header, so reordering it (re-padded to 8 bytes) leaves the tensors untouched.
    """
    size = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload[8 + size :]


# A vector file's JSON header: three tensor entries and the nsteer metadata (about 2 KB; phrasings and searched
# settings from a recipe of at most 1 MiB stay far below). A crafted 100 MB header (safetensors' own limit) of numbers
# took minutes and gigabytes to load, in every `nsteer list` of its folder.
MAX_HEADER_BYTES = 4 * MIB


def load_vector(path: str | Path) -> SteeringVector:
    """Read and validate a vector file; every defect gets a VectorFileError that names it."""
    from safetensors import safe_open

    require(path, (str, os.PathLike), "path")
    path = require_file(path, "vector file", VectorFileError, "Compute one with `nsteer compute RECIPE`.")
    with open(path, "rb") as stream:  # the header's length, before safetensors parses (up to 100 MB of) it
        declared = int.from_bytes(stream.read(8).ljust(8, b"\0"), "little")
    if declared > MAX_HEADER_BYTES:
        raise VectorFileError(
            f"{path} is not a readable safetensors vector file (truncated or another format: it declares a "
            f"{declared:,}-byte header; a vector's is a few kilobytes, at most {MAX_HEADER_BYTES // MIB} MiB is read). "
            "Recompute it with `nsteer compute`, or copy it again."
        )
    try:
        with safe_open(str(path), framework="pt") as stream:
            header = stream.metadata() or {}
            # Shapes first: a tensor is read into memory only once its shape matches the validated metadata.
            shapes = {name: tuple(stream.get_slice(name).get_shape()) for name in stream.keys()}
            metadata = VectorMetadata.from_json(header.get("nsteer", ""), path, _format_version(header, path))
            missing = [name for name in TENSOR_NAMES if name not in shapes]
            if missing:
                raise VectorFileError(f"{path} lacks the tensor(s) {', '.join(missing)}.")
            expected = (metadata.n_layers, metadata.hidden_size)
            found = [shapes[name] for name in TENSOR_NAMES]
            if found != [expected, expected[:1], expected[:1]]:
                raise VectorFileError(
                    f"{path}: tensor shapes {', '.join(str(shape) for shape in found)} do not match the metadata "
                    f"({metadata.n_layers} layers, width {metadata.hidden_size})."
                )
            directions, mean_projections, norms = (stream.get_tensor(name) for name in TENSOR_NAMES)
    except VectorFileError:
        raise
    except Exception as error:  # safetensors raises its own error type or OSError for a broken header
        raise VectorFileError(
            f"{path} is not a readable safetensors vector file (truncated or another format: {error}). "
            "Recompute it with `nsteer compute`, or copy it again."
        ) from None
    problem = tensor_problem(directions, mean_projections, norms)
    if problem:
        raise VectorFileError(f"{path}: {problem}; recompute the vector (or copy it again).")
    return SteeringVector(directions, mean_projections, norms, metadata)


def _format_version(header: Mapping[str, str], path: Path) -> int:
    """The vector format version a file declares; a file of a newer version than this nsteer reads is refused."""
    name, _, version = str(header.get("format", "")).partition("/")
    if name != FORMAT_NAME or not version.isdigit() or "nsteer" not in header:
        raise VectorFileError(f"{path} is a safetensors file but not an nsteer vector (no '{FORMAT}' metadata).")
    if not 1 <= int(version) <= FORMAT_VERSION:
        raise VectorFileError(
            f"{path} was written in vector format version {int(version)}, and this nsteer reads versions 1 to "
            f"{FORMAT_VERSION}: upgrade nsteer to read it."
        )
    return int(version)


def weights_match(metadata: VectorMetadata, handle: ModelHandle) -> bool | None:
    """Whether the vector's weights fingerprint matches the model's; None when the two cannot be compared.

    The weights are the same whatever dtype either side loaded them in. A file from before dtype-independent
    fingerprints holds a hash of float32 samples, which only a float32 model can check.
    """
    stored = metadata.weights_fingerprint
    if not stored or not handle.weights_fingerprint:
        return None  # a remote model or an imported vector: the weights are unknown on one side
    if stored.startswith(FINGERPRINT_PREFIX):
        return stored == handle.weights_fingerprint
    legacy = float32_weights_fingerprint(handle.hf_model)
    return stored == legacy if legacy else None


def tensor_problem(directions: torch.Tensor, mean_projections: torch.Tensor, norms: torch.Tensor) -> str | None:
    """What is wrong with a vector's tensors, or None: float32, finite, each direction a unit row (or a zero row, for a
    layer an imported file does not steer) whose norm is positive exactly when the row is not zero."""
    tensors = {"directions": directions, "mean_projections": mean_projections, "norms": norms}
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            return f"the tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, not float32"
        if not torch.isfinite(tensor).all():
            return f"the tensor '{name}' holds NaN or infinite values"
    if (norms < 0).any():
        return f"the norms of layer(s) {_layers(norms < 0)} are negative"
    lengths = directions.double().norm(dim=-1)
    zero = lengths == 0
    if ((lengths - 1).abs() > UNIT_TOLERANCE)[~zero].any():
        return (
            f"the directions of layer(s) {_layers(~zero & ((lengths - 1).abs() > UNIT_TOLERANCE))} are not unit length"
        )
    if (zero != (norms == 0)).any():
        return f"layer(s) {_layers(zero != (norms == 0))} have a zero direction with a non-zero norm, or the reverse"
    if bool(zero.all()):
        return "every direction is zero, so it steers nothing"
    return None


def _layers(mask: torch.Tensor) -> list[int]:
    found = [int(index) for index in mask.nonzero().flatten().tolist()]
    return found[:10] + (["..."] if len(found) > 10 else [])


def same_model(metadata: VectorMetadata, handle: ModelHandle) -> bool:
    """Whether the vector was computed on this very model (weights when they can be compared, else id + config)."""
    match = weights_match(metadata, handle)
    if match is not None:
        return match
    return metadata.model_id == handle.model_id and metadata.config_hash == handle.config_hash


def check_compatible(vector: SteeringVector, handle: ModelHandle, *, allow_transfer: bool = False) -> None:
    """Refuse a vector made for another model: shape always, identity unless ``allow_transfer``."""
    require(vector, SteeringVector, "vector", "Load one with nsteer.load_vector.")
    require(handle, ModelHandle, "handle", "Open one with nsteer.open_model.")
    meta = vector.metadata
    if meta.hidden_size != handle.hidden_size or meta.n_layers != handle.n_layers:
        raise VectorFileError(
            f"The vector '{meta.instruction_id}' was made for {meta.model_id} (width {meta.hidden_size}, "
            f"{meta.n_layers} layers) but {handle.model_id} has width {handle.hidden_size} "
            f"and {handle.n_layers} layers. Vectors only apply to models of the same width and depth: "
            "compute one for this model with `nsteer compute`."
        )
    if same_model(meta, handle) or allow_transfer:
        return
    differences = []
    if meta.model_id != handle.model_id:
        differences.append(f"model id {meta.model_id!r} vs {handle.model_id!r}")
    if meta.architecture != handle.architecture:
        differences.append(f"architecture {meta.architecture} vs {handle.architecture}")
    if meta.config_hash != handle.config_hash:
        differences.append("the model configuration")
    if weights_match(meta, handle) is False:
        differences.append("the weights")
    raise VectorFileError(
        f"The vector '{meta.instruction_id}' was computed on another model "
        f"({'; '.join(differences) or 'identity differs'}). "
        "To apply it anyway (e.g. instruction-tuned to base model of the same shape), pass --allow-transfer "
        "or set `transfer: true` in the recipe."
    )


def vector_summary(vector: SteeringVector) -> dict[str, Any]:
    """A JSON-friendly summary for `nsteer inspect`."""
    meta = vector.metadata
    norms = vector.norms.tolist()
    return {
        "instruction": meta.instruction_id,
        "category": meta.category,
        "model": meta.model_id,
        "architecture": meta.architecture,
        "width": meta.hidden_size,
        "layers": meta.n_layers,
        "pairs": meta.n_pairs,
        "chosen": meta.chosen.to_dict() if meta.chosen else None,
        "chosen_for": settings_dict(meta.chosen_for),
        "imported_from": meta.imported_from or None,
        "largest_norm_layer": int(max(range(len(norms)), key=norms.__getitem__)) if norms else None,
        "norms": [round(value, 4) for value in norms],
        "mean_projections": [round(value, 4) for value in vector.mean_projections.tolist()],
        "finite": all(math.isfinite(value) for value in norms),
        "nsteer_version": meta.nsteer_version,
    }


VECTORS_ENV = "NSTEER_VECTORS"


@dataclass(frozen=True)
class ShippedVector:
    """A vector file found under a vectors folder, with its metadata."""

    path: Path
    metadata: VectorMetadata
    norms: tuple[float, ...] = ()  # ‖u_l‖ per layer: a weight searched as k × ‖u_l‖ is k times this file's own norm


def default_vectors_dir() -> Path:
    """Where the project's shipped vectors live: ``$NSTEER_VECTORS``, else ``vectors/`` beside the nsteer package."""
    override = os.environ.get(VECTORS_ENV)
    return Path(override).expanduser() if override else Path(__file__).resolve().parents[1] / "vectors"


def shipped_vectors(directory: str | Path | None = None) -> list[ShippedVector]:
    """Every vector file under ``directory`` (default: the shipped vectors), sorted by path; a bad file raises."""
    found, unreadable = scan_vectors(directory)
    if unreadable:
        raise VectorFileError(unreadable[0][1])
    return found


def scan_vectors(directory: str | Path | None = None) -> tuple[list[ShippedVector], list[tuple[Path, str]]]:
    """The readable vector files under ``directory`` (default: the shipped vectors), sorted by path, and apart from
    them each file that could not be read with the reason: one bad file does not hide the others."""
    root = Path(directory) if directory is not None else default_vectors_dir()
    if not root.is_dir():
        raise VectorFileError(f"No vectors folder at {root}. Give one with --vectors DIR (or set {VECTORS_ENV}).")
    found, unreadable = [], []
    for path in sorted(root.rglob("*.safetensors")):
        try:
            vector = load_vector(path)
            found.append(ShippedVector(path, vector.metadata, tuple(vector.norms.tolist())))
        except NsteerError as error:
            unreadable.append((path, str(error)))
    return found, unreadable


def applied_weight(chosen: SearchedSetting, norms: Sequence[float]) -> float:
    """The weight a searched setting applies with the vector whose norms are ``norms``: k × its own ‖u_l‖ for a
    relative weight (a shared word setting stores the absolute weight of the word it was searched on), else the
    stored weight."""
    if chosen.weight_relative is None or chosen.layer is None or not 0 <= chosen.layer < len(norms):
        return chosen.weight
    return chosen.weight_relative * float(norms[chosen.layer])


def listing_row(vector: ShippedVector, root: str | Path | None = None) -> dict[str, Any]:
    """One JSON-friendly row for `nsteer list`: instruction, model, shape, pairs and the searched (chosen) setting."""
    meta, chosen = vector.metadata, vector.metadata.chosen
    try:
        file = str(vector.path.relative_to(root)) if root is not None else str(vector.path)
    except ValueError:
        file = str(vector.path)
    return {
        "instruction": meta.instruction_id,
        "category": meta.category,
        "model": meta.model_id,
        "layers": meta.n_layers,
        "width": meta.hidden_size,
        "pairs": meta.n_pairs,
        "searched": chosen is not None,
        "no_steering": chosen is not None and chosen.no_steering,
        "layer": chosen.layer if chosen else None,
        "mode": chosen.mode if chosen else None,
        "weight": applied_weight(chosen, vector.norms) if chosen else None,
        "weight_relative": chosen.weight_relative if chosen else None,
        "positions": chosen.positions if chosen else None,
        "score": chosen.score if chosen else None,
        "baseline_score": chosen.baseline_score if chosen else None,
        "substantive_score": chosen.substantive_score if chosen else None,
        "baseline_substantive_score": chosen.baseline_substantive_score if chosen else None,
        "condition": chosen.condition if chosen else None,
        "shared_search": list(chosen.shared_search.words) if chosen and chosen.shared_search else [],
        "searched_for": sorted(meta.chosen_for),  # other instructions that borrow this vector, with their own setting
        "file": file,
    }
