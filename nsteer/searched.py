"""The searched setting: what a layer search chose for one instruction on one vector, as a typed record.

A vector file keeps one per instruction that uses the vector (its own under ``chosen``, a borrower's under
``chosen_for[instruction]``). The record is the only way a setting enters or leaves a file: :meth:`to_dict` writes it,
:func:`read_setting` reads it back with every field type-checked (layers in range, numbers finite, shares in
[0, 1]), so a malformed file is a VectorFileError naming the field.

Adding a field is one declaration here with a default (``None`` for "not recorded"): files without it read as the
default, and a field left at its default is not written, so files that do not use it keep their bytes. A field whose
absence must mean something else in older files needs a new vector format version (``nsteer.vectors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nsteer.constants import MODES, POSITIONS
from nsteer.errors import VectorFileError
from nsteer.limits import MAX_CLAMP, MAX_LAYERS
from nsteer.records import FieldProblem, parse_record, record_dict

_SHARE = {"range": (0.0, 1.0)}  # an accuracy or a share of answers
_LAYERS = {"layer": True}

#: Written even at their default: what a setting steers with is always spelled out in the file.
_ALWAYS = ("layer", "mode", "weight", "positions")


def options_words(block: int, gate: float | None, clamp: float | None, skip_first: bool, centered: bool) -> str:
    """Edit options that are on, in words (``block 2, gate 0.5``); empty when none is."""
    parts = [f"block {block}"] if block > 1 else []
    parts += [f"gate {gate:g}"] if gate is not None else []
    parts += [f"clamp {clamp:g}"] if clamp is not None else []
    parts += ["skip first"] if skip_first else []
    parts += ["centered"] if centered else []
    return ", ".join(parts)


@dataclass(frozen=True)
class SharedSearch:
    """A setting searched once on several vectors' pooled answers and recorded in each of them."""

    words: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class SearchedSetting:
    """Where and how to steer with a vector (``layer`` None: the search chose no steering), and the evidence."""

    layer: int | None = field(metadata=_LAYERS)
    mode: str = field(default="set", metadata={"choices": MODES})
    weight: float = 1.0  # absolute: what the edit applies
    positions: str = field(default="all", metadata={"choices": POSITIONS})
    weight_relative: float | None = None  # the k of a weight searched on the vector's scale (weight = k x ||u_l||)
    target_scale: float = 1.0  # a set edit's target is target_scale x z_l
    # How the edit was shaped while searched (see nsteer.edits.EditOptions): the steer entry's own options.
    block: int = field(default=1, metadata={"range": (1, MAX_LAYERS)})
    gate: float | None = field(default=None, metadata={"range": (0.0, 1.0)})
    clamp: float | None = field(default=None, metadata={"range": (-MAX_CLAMP, MAX_CLAMP)})
    skip_first: bool = False
    centered: bool = False
    # A centered setting's direction is u_l minus the mean of these vectors (instruction ids, sorted): the same layer
    # and weight say nothing about a direction centered on other vectors.
    centered_on: tuple[str, ...] | None = None
    # The evidence: validation scores of the winner and of the unsteered baseline, and what was searched how.
    score: float | None = field(default=None, metadata=_SHARE)
    strict_score: float | None = field(default=None, metadata=_SHARE)
    degenerate_share: float | None = field(default=None, metadata=_SHARE)
    baseline_score: float | None = field(default=None, metadata=_SHARE)
    baseline_degenerate_share: float | None = field(default=None, metadata=_SHARE)
    # Shares of substantive passes (loose passes on answers neither degenerate, hollow nor an echo), what the search
    # ranks by first; None in files searched before it did.
    substantive_score: float | None = field(default=None, metadata=_SHARE)
    baseline_substantive_score: float | None = field(default=None, metadata=_SHARE)
    split: str | None = None
    condition: str | None = field(default=None, metadata={"choices": ("absent", "present", "both")})
    n_prompts: int | None = field(default=None, metadata={"range": (0, float("inf"))})
    layers_searched: tuple[int, ...] | None = field(default=None, metadata=_LAYERS)
    weights_searched: tuple[float, ...] | None = None
    weights_relative: bool = False  # weights_searched are ks on the vector's scale, not absolute weights
    target_scales_searched: tuple[float, ...] | None = None
    modes_searched: tuple[str, ...] | None = field(default=None, metadata={"choices": MODES})
    rule: str | None = None
    shared_search: SharedSearch | None = None
    # An imported llama.cpp control vector: every layer its file steers (``layer`` is the first), never searched.
    layers: tuple[int, ...] | None = field(default=None, metadata=_LAYERS)
    imported: bool = False

    @property
    def no_steering(self) -> bool:
        """Whether the search chose not to steer (the unsteered baseline won)."""
        return self.layer is None

    @property
    def label(self) -> str:
        """``no steering`` or ``layer 14 set w=1``."""
        return "no steering" if self.no_steering else f"layer {self.layer} {self.mode} w={self.weight:g}"

    @property
    def options_label(self) -> str:
        """The edit options the setting was searched with, in words (``block 2, gate 0.5``), empty when none."""
        return options_words(self.block, self.gate, self.clamp, self.skip_first, self.centered)

    def to_dict(self) -> dict[str, Any]:
        """The setting as written into a vector file's metadata (fields at their default left out)."""
        return {**record_dict(self, always=_ALWAYS), "no_steering": self.no_steering}


def read_setting(data: Any, path: str, context: Mapping[str, Any]) -> SearchedSetting:
    """A setting from a file's metadata; :class:`nsteer.records.FieldProblem` names a field that does not fit."""
    if isinstance(data, Mapping) and "no_steering" in data:
        data = dict(data)
        flag = data.pop("no_steering")  # redundant with the layer, and written for readers of the JSON
        if not isinstance(flag, bool):
            raise FieldProblem(f"{path}.no_steering", f"expected true or false, got {flag!r}.")
        if flag != (data.get("layer") is None):
            raise FieldProblem(f"{path}.no_steering", f"{str(flag).lower()} contradicts layer {data.get('layer')!r}.")
    setting = parse_record(SearchedSetting, data, path, context)
    # Options no search could have recorded: a block past the vector's last layer, a centered set or clamp.
    n_layers = context.get("n_layers")
    if setting.layer is not None and n_layers is not None and setting.layer + setting.block > n_layers:
        raise FieldProblem(
            f"{path}.block",
            f"a block of {setting.block} layers from layer {setting.layer} ends past the vector's last layer "
            f"{n_layers - 1}.",
        )
    if setting.centered and (setting.mode == "set" or setting.clamp is not None):
        raise FieldProblem(f"{path}.centered", "a centered direction is searched with mode add or ablate, no clamp.")
    if setting.centered_on is not None:
        if not setting.centered:
            raise FieldProblem(f"{path}.centered_on", "only a centered setting names the vectors it was centered on.")
        if len(setting.centered_on) < 3:
            raise FieldProblem(
                f"{path}.centered_on",
                f"a centered direction is taken against 3 or more vectors, not {len(setting.centered_on)}.",
            )
    if setting.imported and setting.layers is None:
        raise FieldProblem(f"{path}.imported", "only an imported control vector's setting, with its layers, says so.")
    return setting


def read_settings_by_instruction(data: Any, path: str, context: Mapping[str, Any]) -> dict[str, SearchedSetting]:
    """The ``chosen_for`` mapping: instruction -> setting, each checked like ``chosen``."""
    if not isinstance(data, Mapping) or not all(isinstance(key, str) for key in data):
        raise FieldProblem(path, "expected a mapping of instruction to setting.")
    return {name: read_setting(value, f"{path}[{name!r}]", context) for name, value in sorted(data.items())}


def setting_reader(data: Any, path: str, context: Mapping[str, Any]) -> SearchedSetting | None:
    """The ``chosen`` field's reader: null (never searched) or a setting."""
    return None if data is None else read_setting(data, path, context)


def setting_writer(setting: SearchedSetting | None) -> dict[str, Any] | None:
    """The ``chosen`` field's writer: null when never searched."""
    return None if setting is None else setting.to_dict()


def check_setting(setting: SearchedSetting, *, n_layers: int, where: str) -> None:
    """Refuse a setting built in code whose layers do not exist in a model of ``n_layers`` layers."""
    layers = [setting.layer, *(setting.layers_searched or ()), *(setting.layers or ())]
    bad = [layer for layer in layers if layer is not None and not 0 <= layer < n_layers]
    if bad:
        raise VectorFileError(f"{where}: layer {bad[0]} is out of range: the vector has layers 0..{n_layers - 1}.")


def settings_dict(settings: Mapping[str, SearchedSetting]) -> dict[str, dict[str, Any]]:
    """``chosen_for`` as written into a file, sorted by instruction."""
    return {name: settings[name].to_dict() for name in sorted(settings)}
