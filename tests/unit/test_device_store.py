"""The device's bundle store: verified saves, atomic replacement, refusals that say why, and
whatever odd thing sits on disk turned into a refusal or a recovery, never a hang or a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from device_fixtures import random_bundle, tiny_checkpoint

from paramcast.common.errors import DeviceMismatch, IntegrityError, InvalidInput, VersionMismatch
from paramcast.common.files import read_regular, sweep_temporaries
from paramcast.common.serde import decode_bundle, encode_bundle
from paramcast.device.store import MAX_BUNDLE_BYTES, BundleStore, ExpiredBundle, write_atomic

REPO = Path(__file__).resolve().parents[2]


def store_for(root: Path, device_id: str | None = None) -> BundleStore:
    b = tiny_checkpoint()
    return BundleStore(root, b.model_id, b.base_version, decode_bundle, device_id=device_id)


def bundle_for(device_id: str, seed: int = 1) -> bytes:
    bundle = random_bundle(seed=seed)
    bundle.device_id = device_id
    return encode_bundle(bundle, "int8")


def finishes(fn, timeout_s: float = 5.0):
    """fn()'s result, failing the test (instead of hanging it) when fn blocks longer than timeout_s."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"blocked for more than {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


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
        assert [p.name for p in bundles.iterdir()] == [store.path.name]  # no temporary left behind
    assert len(seen) >= 2  # the writer really was replacing the file while it was killed


def test_another_devices_bundle_is_refused_on_save_and_on_load(tmp_path):
    store = store_for(tmp_path, device_id="dev-a")
    mine = store.save(bundle_for("dev-a"))
    with pytest.raises(DeviceMismatch, match="generated for 'dev-b', not for this device 'dev-a'"):
        store.save(bundle_for("dev-b", seed=2))
    assert store.load().bundle_id == mine.bundle_id  # the refused save left the old file
    store.path.write_bytes(bundle_for("dev-b", seed=3))  # a valid file copied over from another device
    assert store.load() is None
    assert "not for this device 'dev-a'" in store.rejected


def _make_odd(path: Path, kind: str) -> None:
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)  # a plain open() for reading blocks until a writer appears
    elif kind == "symlink":
        target = path.with_name("elsewhere")
        target.write_bytes(bundle_for("dev-a"))
        path.symlink_to(target)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(MAX_BUNDLE_BYTES + 1)  # sparse: costs no disk
    else:  # unreadable: not even its owner may read it
        path.write_bytes(bundle_for("dev-a"))
        path.chmod(0)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink", "huge", "unreadable"])
def test_odd_files_at_the_bundle_path_are_refused_and_then_replaced(tmp_path, kind):
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    store = store_for(tmp_path, device_id="dev-a")
    _make_odd(store.path, kind)
    assert finishes(store.load) is None
    expected = {"directory": "directory", "fifo": "FIFO", "symlink": "symbolic link", "huge": "more than",
                "unreadable": "cannot be read"}[kind]
    assert expected in store.rejected
    assert not os.path.lexists(store.path)  # moved aside to .rejected, out of the way
    _make_odd(store.path, kind)  # and again, for the writer to meet
    saved = finishes(lambda: store.save(bundle_for("dev-a", seed=4)))
    assert finishes(store_for(tmp_path, device_id="dev-a").load).bundle_id == saved.bundle_id


def test_write_atomic_replaces_a_directory_found_at_its_path(tmp_path):
    target = tmp_path / "current.json"
    target.mkdir()
    write_atomic(target, b"{}")
    assert target.read_bytes() == b"{}"


def test_read_regular_bounds_what_it_reads(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    assert read_regular(tmp_path / "f", 5) == b"12345"
    with pytest.raises(IntegrityError, match="more than the 4 bytes"):
        read_regular(tmp_path / "f", 4)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 4)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_swept_when_a_store_opens(tmp_path):
    name = f"{tiny_checkpoint().model_id}.bundle"
    dead = tmp_path / f"{name}.{_dead_pid()}.tmp"  # the naming of a writer killed before its rename
    dead.write_bytes(b"half a bundle")
    unpacking = tmp_path / f".pkg.{_dead_pid()}.k3j_x.tmp"  # a package unpack interrupted
    unpacking.mkdir()
    (unpacking / "model.onnx").write_bytes(b"x")
    old = tmp_path / f"{name}.{os.getpid()}.tmp"  # this pid, but older than any write takes: a reused pid
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / f"{name}.{os.getpid()}.ab12.tmp"  # a write in progress in this process: kept
    live.write_bytes(b"x")
    keep = tmp_path / "notes.tmp"  # not a temporary's name: never touched
    keep.write_bytes(b"x")
    store_for(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, keep.name])
    assert sweep_temporaries(tmp_path / "absent") == []


@pytest.mark.parametrize("model_id", ["../../escaped", "/abs/path", "a/b", "", ".hidden", "x" * 200])
def test_a_model_id_that_is_not_a_plain_name_cannot_place_files(tmp_path, model_id):
    root = tmp_path / "state" / "bundles"
    with pytest.raises(InvalidInput, match="model_id"):
        BundleStore(root, model_id, tiny_checkpoint().base_version, decode_bundle)
    assert not any(tmp_path.rglob("*.bundle"))
