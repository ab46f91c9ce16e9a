#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC stubs from protos/paramcast/v1/*.proto.
#
# This script is the only way the committed *_pb2.py, *_pb2_grpc.py and *_pb2.pyi files are made;
# tools/check_protos.sh runs it on a scratch copy and fails when the committed files differ.
#
# Usage: tools/gen_protos.sh [ROOT]   (ROOT defaults to the repository root; it must contain protos/)
#
# protoc runs with -I ROOT/protos, so the generated modules import as paramcast.v1.<name>_pb2, the
# proto package's own name (pyproject maps paramcast.v1 to protos/paramcast/v1).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${1:-$repo_root}"
python="${PYTHON:-python}"

# The generated _pb2_grpc.py refuses to import under a grpcio older than the grpcio-tools that
# wrote it, so stubs generated with a newer grpcio-tools would break every deployment.
"$python" - <<'PY'
from importlib.metadata import version
import sys

def key(v):
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())

tools, runtime = version("grpcio-tools"), version("grpcio")
if key(tools) > key(runtime):
    sys.exit(f"grpcio-tools {tools} is newer than grpcio {runtime}; install grpcio-tools<={runtime}")
PY

cd "$root"
shopt -s nullglob
protos=(protos/paramcast/v1/*.proto)
(( ${#protos[@]} )) || { echo "no .proto files under $root/protos/paramcast/v1" >&2; exit 1; }

# Remove old outputs first so a deleted or renamed .proto leaves no stale module behind.
rm -f protos/paramcast/v1/*_pb2.py protos/paramcast/v1/*_pb2_grpc.py protos/paramcast/v1/*_pb2.pyi
cd protos
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "${protos[@]#protos/}"
echo "generated stubs for: ${protos[*]}"
