#!/usr/bin/env bash
# Set up fura on a fresh machine: a virtual environment in .venv holding exactly the locked environment
# (requirements/lock-cpu.txt: the CPU build of torch, installed first, then fura[dev] and every transitive
# dependency at the version CI tests). It is idempotent, so a second run is quick.
#
#   bash scripts/setup.sh            the locked environment in .venv (what the README's commands and CI use)
#   bash scripts/setup.sh --latest   the newest versions pyproject.toml allows, in .venv-latest, to find drift:
#                                    .venv-latest/bin/python -m pytest -q
# Regenerate the lock with `bash scripts/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${FURA_TORCH_SPEC:-torch==2.13.0}"  # the CPU build on this kind of machine; not upgraded by --latest
LOCK=requirements/lock-cpu.txt
case "${1:-}" in
  "") VENV=.venv ;;
  --latest) VENV=.venv-latest ;;
  *) echo "usage: bash scripts/setup.sh [--latest]" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
if [ "$VENV" = .venv ]; then
  "${pip[@]}" install -q -c "$LOCK" pip setuptools
  "${pip[@]}" install -q -c "$LOCK" "$TORCH_SPEC"
  # The locked setuptools builds fura itself too (no isolated build environment with unpinned tools).
  "${pip[@]}" install -q -c "$LOCK" --no-build-isolation -e ".[dev]"
else
  echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"  # an eager upgrade would otherwise swap in a CUDA torch
  "${pip[@]}" install -q --upgrade pip setuptools
  "${pip[@]}" install -q "$TORCH_SPEC"
  "${pip[@]}" install -q -c "$VENV/torch-constraint.txt" --upgrade --upgrade-strategy eager --no-build-isolation \
    -e ".[dev]"
  "$VENV/bin/python" -m pip list --format=freeze > "$VENV/versions.txt"
  echo "newest allowed versions installed in $VENV (listed in $VENV/versions.txt)"
fi
