#!/usr/bin/env bash
# Fail (exit 1, with a diff) when the committed generated stubs are not exactly what
# tools/gen_protos.sh produces from the committed .proto files. Run in CI and by tests/unit/test_protos.py.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# Regenerate in a scratch copy so the working tree is never modified by a check.
mkdir -p "$scratch/protos/paramcast"
cp -R "$repo_root/protos/paramcast/v1" "$scratch/protos/paramcast/v1"
"$repo_root/tools/gen_protos.sh" "$scratch" >/dev/null

status=0
for generated in "$scratch"/protos/paramcast/v1/*_pb2.py "$scratch"/protos/paramcast/v1/*_pb2_grpc.py \
                 "$scratch"/protos/paramcast/v1/*_pb2.pyi; do
    committed="$repo_root/protos/paramcast/v1/$(basename "$generated")"
    if [[ ! -f "$committed" ]]; then
        echo "missing generated file: ${committed#"$repo_root"/} (run tools/gen_protos.sh)" >&2
        status=1
    elif ! diff -u "$committed" "$generated"; then
        echo "stale generated file: ${committed#"$repo_root"/} (run tools/gen_protos.sh)" >&2
        status=1
    fi
done
# A committed stub without a .proto behind it is stale too.
for committed in "$repo_root"/protos/paramcast/v1/*_pb2.py "$repo_root"/protos/paramcast/v1/*_pb2_grpc.py \
                 "$repo_root"/protos/paramcast/v1/*_pb2.pyi; do
    [[ -e "$committed" ]] || continue
    if [[ ! -f "$scratch/protos/paramcast/v1/$(basename "$committed")" ]]; then
        echo "generated file without a .proto: ${committed#"$repo_root"/}" >&2
        status=1
    fi
done
[[ $status -eq 0 ]] && echo "generated stubs are up to date"
exit $status
