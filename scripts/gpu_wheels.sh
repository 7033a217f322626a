#!/usr/bin/env bash
# Fill a wheel folder (default .gpu-wheels/) with scripts/gpu_wheels.txt for a GPU machine that cannot reach PyPI:
# binary wheels only, no dependencies resolved (the list is complete), for Python 3.12 on manylinux x86-64 unless
# PYTHON_VERSION says otherwise (e.g. PYTHON_VERSION=3.11 to try the install step on this machine's Python).
#
#     scripts/gpu_wheels.sh [FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.gpu-wheels}
python_version=${PYTHON_VERSION:-3.12}
pip=(${PIP:-python3 -m pip})
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
mkdir -p "$folder"
rm -f "$folder"/*.whl
grep -v '^\s*\(#\|$\)' scripts/gpu_wheels.txt | xargs "${pip[@]}" download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp "${platforms[@]}" -d "$folder"
count=$(ls "$folder"/*.whl | wc -l)
size=$(du -sk "$folder" | cut -f1)
echo "$count wheels for Python $python_version in $folder ($((size / 1024)) MiB)"
