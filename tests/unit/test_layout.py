"""Which part of the tree may import which: read from the source, so a stray import fails here
before it fails on a device without torch."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from without_torch import run_without_torch

REPO = Path(__file__).resolve().parents[2]


def imports_of(folder: str) -> dict[str, set[str]]:
    """Module file (relative to the repository) -> every module name it imports, at any depth."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[str(path.relative_to(REPO))] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        path: sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        for path, names in imports_of(folder).items()
        if any(n == f or n.startswith(f + ".") for n in names for f in forbidden)
    }


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("cloud", ("paramcast.device",)),  # the package format both sides need lives in common/
    ("common", ("paramcast.cloud", "paramcast.device", "paramcast.simulation", "paramcast.commands", "torch")),
    ("device", ("paramcast.cloud", "paramcast.simulation", "paramcast.commands", "torch")),
])
def test_imports_point_only_where_the_layout_allows(folder, forbidden):
    assert offenders(folder, forbidden) == {}


def test_the_checker_sees_imports():
    assert "paramcast.common.package.DevicePackage" in imports_of("device")["device/runtime.py"]
    assert offenders("cloud", ("paramcast.common.package",))  # cloud does use the package format


# Protobuf stays at the edges: the codec, the gRPC servicer and server, the device's gRPC client,
# and the same edge on Ray Serve (the handlers registered on its proxy, the replica that answers).
WIRE_MODULES = {"common/serde.py", "cloud/service/servicer.py", "cloud/service/server.py", "device/client.py",
                "cloud/service/ray_proxy.py", "cloud/service/ray_serve.py"}


def test_generated_code_is_imported_only_at_the_wire():
    importers = {path for folder in ("common", "cloud", "device") for path in offenders(folder, ("paramcast.v1",))}
    assert importers == WIRE_MODULES


def test_the_runtime_and_the_store_load_no_generated_code(tmp_path):
    script = ("import json, sys; import paramcast.device.runtime, paramcast.device.store, paramcast.device.policy; "
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('paramcast.v1', 'google.protobuf')))))")
    proc = run_without_torch(tmp_path, ["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_tests_are_marked_by_their_folder(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("integration") is None
