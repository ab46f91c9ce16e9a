#!/usr/bin/env bash
# mypy over the installed layout. The editable install maps `paramcast.*` onto the source folders
# with an import hook that mypy cannot follow, so this script lays the same mapping out as a tree
# of symlinks (the one in pyproject.toml's [tool.setuptools.package-dir]) and checks that tree.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
pkg="$tree/paramcast"
mkdir -p "$pkg"
for entry in "$repo_root"/tools/*; do
    ln -s "$entry" "$pkg/$(basename "$entry")"
done
for part in common cloud device; do
    ln -s "$repo_root/$part" "$pkg/$part"
done
ln -s "$repo_root/protos/paramcast/v1" "$pkg/v1"
cd "$repo_root"
mypy --config-file pyproject.toml "$pkg"
