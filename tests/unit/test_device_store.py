"""The device's bundle store: verified saves, atomic replacement, refusals that say why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from device_fixtures import random_bundle, tiny_checkpoint

from paramcast.common.errors import IntegrityError, VersionMismatch
from paramcast.common.serde import decode_bundle, encode_bundle
from paramcast.device.store import BundleStore, ExpiredBundle

REPO = Path(__file__).resolve().parents[2]


def store_for(root: Path) -> BundleStore:
    b = tiny_checkpoint()
    return BundleStore(root, b.model_id, b.base_version, decode_bundle)


def test_save_then_load_round_trips(tmp_path):
    store = store_for(tmp_path)
    assert store.load() is None and store.rejected is None  # nothing held yet
    data = encode_bundle(random_bundle(seed=1), "int8")
    saved = store.save(data)
    loaded = store_for(tmp_path).load()  # a fresh process would see the same
    assert loaded is not None and loaded.bundle_id == saved.bundle_id
    assert store.path.read_bytes() == data


def test_save_refuses_bad_bundles_and_keeps_the_old_one(tmp_path):
    store = store_for(tmp_path)
    good = encode_bundle(random_bundle(seed=1), "int8")
    store.save(good)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="checksum|bytes|expected"):
        store.save(bytes(flipped))
    other = random_bundle(seed=2)
    other.base_version = "0000000000000000"
    with pytest.raises(VersionMismatch, match="base version"):
        store.save(encode_bundle(other, "int8"))
    expired = random_bundle(seed=3)
    expired.expires_at_ms = expired.created_at_ms + 1
    time.sleep(0.01)
    with pytest.raises(ExpiredBundle, match="expired"):
        store.save(encode_bundle(expired, "int8"))
    assert store.path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]  # no temporary files left behind


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "other_base", "garbage"])
def test_load_rejects_a_damaged_or_foreign_file_and_says_why(tmp_path, damage):
    store = store_for(tmp_path)
    data = encode_bundle(random_bundle(seed=1), "fp16")
    if damage == "bitflip":
        data = data[:100] + bytes([data[100] ^ 0x10]) + data[101:]
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "other_base":
        other = random_bundle(seed=1)
        other.base_version = "0123456789abcdef"
        data = encode_bundle(other, "fp16")
    else:
        data = os.urandom(500)
    tmp_path.mkdir(exist_ok=True)
    store.path.write_bytes(data)
    assert store.load() is None
    expected = "base version" if damage == "other_base" else ""
    assert store.rejected and expected in store.rejected
    assert not store.path.exists() and store.path.with_name(store.path.name + ".rejected").exists()


def test_a_failed_replace_leaves_the_old_bundle(tmp_path, monkeypatch):
    store = store_for(tmp_path)
    old = store.save(encode_bundle(random_bundle(seed=1), "int8"))

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.save(encode_bundle(random_bundle(seed=2), "int8"))
    monkeypatch.undo()
    assert store.load().bundle_id == old.bundle_id
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


def test_killing_a_writer_at_random_moments_never_leaves_a_torn_file(tmp_path):
    """A process saving bundles in a loop is SIGKILLed over and over; what is on disk always verifies."""
    b = tiny_checkpoint()
    bundles = tmp_path / "bundles"
    for i in range(4):
        (tmp_path / f"b{i}.bin").write_bytes(encode_bundle(random_bundle(seed=i), "fp32"))
    script = textwrap.dedent(f"""
        import itertools, sys
        from paramcast.common.serde import decode_bundle
        from paramcast.device.store import BundleStore
        store = BundleStore({str(bundles)!r}, {b.model_id!r}, {b.base_version!r}, decode_bundle)
        blobs = [open({str(tmp_path)!r} + f"/b{{i}}.bin", "rb").read() for i in range(4)]
        print("ready", flush=True)
        for blob in itertools.cycle(blobs):
            store.save(blob)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    valid_ids = {decode_bundle((tmp_path / f"b{i}.bin").read_bytes()).bundle_id for i in range(4)}
    seen = set()
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 0.03 * round_)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        store = BundleStore(bundles, b.model_id, b.base_version, decode_bundle)
        loaded = store.load()
        assert loaded is not None, store.rejected
        assert loaded.bundle_id in valid_ids
        seen.add(loaded.bundle_id)
    assert len(seen) >= 2  # the writer really was replacing the file while it was killed
