"""Fixtures shared by every test module, and markers that follow the folder a test is in."""

from __future__ import annotations

from pathlib import Path

import pytest

FOLDER_MARKERS = ("unit", "integration")  # tests/unit -> @unit, tests/integration -> @integration


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        folder = item.path.resolve().relative_to(tests).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets folder, `../shared/data` from the repository root; skips the test if absent."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path}")
    return path
