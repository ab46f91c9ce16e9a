"""The extras pull in what their names promise: Ray only through `ray`, never through the default,
`device` or `cloud` installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[2]


def _requirements(extra: str | None) -> set[str]:
    """Distribution names an install of paramcast (with `extra`) requires, self-references resolved."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names: set[str] = set()
    todo = list(project["dependencies"]) + (list(extras[extra]) if extra else [])
    seen_extras: set[str] = set()
    while todo:
        req = todo.pop()
        name, _, rest = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req).group(1, 2, 3)  # type: ignore[union-attr]
        if name == "paramcast":
            for e in filter(None, (x.strip() for x in (rest or "").split(","))):
                if e not in seen_extras:
                    seen_extras.add(e)
                    todo.extend(extras[e])
            continue
        names.add(name.lower())
    return names


def test_default_device_and_cloud_installs_do_not_pull_ray():
    for extra in (None, "device", "cloud"):
        assert "ray" not in _requirements(extra), extra


def test_ray_extra_brings_serve_on_top_of_the_cloud_install():
    ray = _requirements("ray")
    assert "ray" in ray and _requirements("cloud") <= ray
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("ray[serve]") for r in project["optional-dependencies"]["ray"])


def test_ci_installs_the_ray_extra():
    assert re.search(r'pip install .*-e "\.\[[^\]]*\bray\b', (REPO / ".ci" / "run").read_text())
