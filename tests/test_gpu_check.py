"""The GPU check's pieces that run without a GPU: the wheel list, the refusal of an incomplete wheel folder, names.

The whole check (scripts/gpu_check.sh) has a CPU fallback; it takes minutes, so the suite tries only its fast paths.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import gpu_slug  # noqa: E402


def pinned() -> dict[str, str]:
    lines = (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9_.+-]*", line) for line in requirements), requirements
    return dict(line.split("==") for line in requirements)


def test_the_wheel_list_pins_the_versions_this_suite_runs_with():
    versions = pinned()
    assert {"nnsight", "pydantic", "pydantic-core"} <= set(versions)
    for name, version in versions.items():
        assert importlib.metadata.version(name) == version, f"{name}: installed here {importlib.metadata.version(name)}"


def test_an_incomplete_wheel_folder_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "pydantic-2.14.4-py3-none-any.whl").write_bytes(b"")
    completed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--wheels", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = completed.stdout + completed.stderr  # the script tees everything into its log
    assert completed.returncode == 2
    assert "lacks: nnsight==0.8.1" in output and "scripts/gpu_wheels.sh" in output
    assert "pydantic==2.14.4" not in output.split("lacks:")[1]


def test_gpu_names_become_file_names():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_slug("***") == "gpu"
