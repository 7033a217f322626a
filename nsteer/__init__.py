"""nsteer: instruction steering for language models through nnsight, locally or on NDIF.

The public SDK is importable from the top level; heavy modules (torch, nnsight) load on first use, so that
``import nsteer`` stays cheap and the CLI can import nnsight on its own terms.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from nsteer.constants import __version__

_EXPORTS = {
    # models and prompts
    "open_model": "nsteer.models",
    "wrap_model": "nsteer.models",
    "ModelHandle": "nsteer.models",
    "builtin_instruction": "nsteer.prompts",
    "builtin_instructions": "nsteer.prompts",
    "instruction_pairs": "nsteer.prompts",
    "load_base_prompts": "nsteer.prompts",
    "Instruction": "nsteer.prompts",
    "PromptPair": "nsteer.prompts",
    "Split": "nsteer.prompts",
    # vectors, edits, generation
    "compute_vector": "nsteer.extract",
    "SteeringVector": "nsteer.vectors",
    "SearchedSetting": "nsteer.searched",
    "save_vector": "nsteer.vectors",
    "load_vector": "nsteer.vectors",
    "check_compatible": "nsteer.vectors",
    "Edit": "nsteer.edits",
    "edit_from_vector": "nsteer.edits",
    "relative_weight": "nsteer.edits",
    "EditOptions": "nsteer.edits",
    "vector_edits": "nsteer.edits",
    "mean_vector": "nsteer.edits",
    "generate": "nsteer.generate",
    "generate_tokens": "nsteer.generate",
    "GenerationConfig": "nsteer.generate",
    # checking answers
    "CheckSpec": "nsteer.evaluate.check_spec",
    "check_response": "nsteer.evaluate.checkers",
    "count_sentences": "nsteer.evaluate.checkers",
    "count_words": "nsteer.evaluate.checkers",
    # recipes and their pipeline
    "Recipe": "nsteer.recipe",
    "load_recipe": "nsteer.recipe",
    "recipe_from_dict": "nsteer.recipe",
    "open_recipe_model": "nsteer.pipeline",
    "compute_recipe_vectors": "nsteer.pipeline",
    "load_recipe_vectors": "nsteer.pipeline",
    "recipe_edits": "nsteer.pipeline",
    "generation_config": "nsteer.pipeline",
    "instruction_splits": "nsteer.pipeline",
    # search, evaluation, reports
    "search_recipe": "nsteer.search",
    "evaluate_recipe": "nsteer.evaluate.table",
    "CELLS": "nsteer.evaluate.table",
    "evaluate_recipe_composition": "nsteer.evaluate.composition",
    "composition_markdown": "nsteer.evaluate.composition",
    "write_composition_report": "nsteer.evaluate.composition",
    "write_eval_report": "nsteer.report",
    "write_search_report": "nsteer.report",
    "cosine_across_layers": "nsteer.report",
    "cosine_between": "nsteer.report",
    "write_similarity_plot": "nsteer.report",
    "text_progress": "nsteer.progress",
    # NDIF jobs and llama.cpp control vectors
    "submit_vector": "nsteer.jobs",
    "submit_recipe_vectors": "nsteer.jobs",
    "submit_generation": "nsteer.jobs",
    "collect": "nsteer.jobs",
    "pending_jobs": "nsteer.jobs",
    "RemoteJob": "nsteer.jobs",
    "CollectedJob": "nsteer.jobs",
    "export_llama_cpp": "nsteer.interop",
    "import_llama_cpp": "nsteer.interop",
    "control_vector_edits": "nsteer.interop",
    # errors
    "NsteerError": "nsteer.errors",
    "RecipeError": "nsteer.errors",
    "PromptDataError": "nsteer.errors",
    "ModelError": "nsteer.errors",
    "VectorFileError": "nsteer.errors",
    "EvaluationError": "nsteer.errors",
    "FileError": "nsteer.errors",
    "RemoteError": "nsteer.errors",
    "ArgumentError": "nsteer.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nsteer' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The nsteer package, whose exported function ``generate`` shares its name with the submodule nsteer.generate.

    Importing a submodule binds it as an attribute of its package, which would turn ``nsteer.generate`` into the
    module (and ``nsteer.generate(...)`` into "'module' object is not callable") as soon as anything imported
    nsteer.generate. Such a binding keeps the exported function instead; ``sys.modules["nsteer.generate"]`` and
    ``from nsteer.generate import ...`` still give the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
