"""Run Python in a subprocess where torch, and the cloud side that needs it, cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Installed as sitecustomize.py ahead of everything else on sys.path, so it runs at interpreter
# start: any import of torch or of paramcast.cloud fails as if torch were absent.
BLOCKER = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = ("torch", "paramcast.cloud")

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
""")

# Printed by a script to show what it loaded: nothing from torch or the cloud side.
LOADED = "sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('paramcast.cloud'))"


def run_without_torch(tmp_path: Path, args: list[str], path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`python ARGS` with the blocker installed, in `tmp_path` (not the repository, whose top-level
    folders would otherwise import as packages of their own); `path` goes on PYTHONPATH after it."""
    blocker_dir = tmp_path / "no-torch"
    blocker_dir.mkdir(exist_ok=True)
    (blocker_dir / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (blocker_dir, *path)))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
