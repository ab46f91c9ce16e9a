"""The manifest's JSON Schema (shipped, checked at load) and the item vocabulary a package carries."""

from __future__ import annotations

import hashlib
import json

import pytest
from device_fixtures import ML_100K_ITEMS, copy_package, tiny_checkpoint

from paramcast.cloud.export import export_package
from paramcast.common.errors import IntegrityError
from paramcast.common.package import (
    MANIFEST_DIGEST_KEY,
    VOCABULARY_FILE,
    DevicePackage,
    ItemVocabulary,
    manifest_digest,
)
from paramcast.common.schema import MANIFEST_SCHEMA, SchemaError, load_schema, validate


def _edit_manifest(pkg, edit) -> None:
    """Edit the manifest and seal it again (its digest checked first would refuse any edit)."""
    path = pkg / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_the_schema_ships_beside_the_package_reader_and_accepts_exported_manifests(tmp_path):
    assert MANIFEST_SCHEMA.is_file() and MANIFEST_SCHEMA.parent.name == "common"
    pkg = copy_package(tmp_path / "pkg")
    validate(json.loads((pkg / "manifest.json").read_text()))


@pytest.mark.parametrize(("edit", "where"), [
    (lambda m: m["slots"]["head.up"].__setitem__("max_rank", "4"), "slots.head.up.max_rank: expected integer"),
    (lambda m: m["slots"]["head.down"].__setitem__("d_in", 0), "slots.head.down.d_in: must be >= 1"),
    (lambda m: m.pop("hidden"), "missing required field 'hidden'"),
    (lambda m: m["outputs"].pop("behaviour"), "outputs: missing required field 'behaviour'"),
    (lambda m: m["files"]["model.onnx"].__setitem__("sha256", "XYZ"), "files.model.onnx.sha256"),
    (lambda m: m["unit_groups"]["head"]["initializers"][0].__setitem__("axis", -1),
     "unit_groups.head.initializers[0].axis: must be >= 0"),
    (lambda m: m["slots"]["head.up"]["inputs"].__setitem__("C", "x"), "slots.head.up.inputs: unexpected field 'C'"),
    (lambda m: m.__setitem__("model_id", "../escape"), "model_id"),
])
def test_a_manifest_that_breaks_the_schema_is_refused_naming_the_field(tmp_path, edit, where):
    pkg = copy_package(tmp_path / "pkg")
    _edit_manifest(pkg, edit)
    with pytest.raises(IntegrityError, match="manifest.json: ") as info:
        DevicePackage.load(pkg)
    assert where in str(info.value)


def test_the_validator_refuses_schemas_using_keywords_it_does_not_implement():
    assert load_schema()["properties"]["format_version"] == {"const": 1}
    from paramcast.common import schema as module

    with pytest.raises(ValueError, match="oneOf"):
        module._check_keywords({"properties": {"x": {"oneOf": []}}}, "")
    with pytest.raises(SchemaError, match="must be 1, got true"):
        validate(True, {"const": 1})  # bool is not the integer 1


def test_export_writes_the_vocabulary_and_a_device_maps_catalogue_ids(tmp_path):
    ids = [""] + [f"movie-{i}" for i in range(1, ML_100K_ITEMS + 1)]
    pkg = DevicePackage.load(export_package(tiny_checkpoint(), tmp_path / "pkg", item_ids=ids))
    entry = pkg.manifest["vocabulary"]
    assert entry == {"file": VOCABULARY_FILE, "size": ML_100K_ITEMS}
    data = (tmp_path / "pkg" / VOCABULARY_FILE).read_bytes()
    assert pkg.manifest["files"][VOCABULARY_FILE]["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(data) == ids
    vocab = pkg.vocabulary
    assert vocab is not None and len(vocab) == ML_100K_ITEMS
    assert vocab.model_ids(["movie-5", "unknown", "movie-1682"]).tolist() == [5, 1682]  # unknown left out
    assert vocab.catalogue([0, 3]) == ["", "movie-3"]


def test_a_vocabulary_of_the_wrong_size_or_tampered_is_refused(tmp_path):
    ids = [""] + [str(i) for i in range(1, ML_100K_ITEMS + 1)]
    with pytest.raises(Exception, match="items, the model has"):
        export_package(tiny_checkpoint(), tmp_path / "short", item_ids=ids[:-1])
    pkg = export_package(tiny_checkpoint(), tmp_path / "pkg", item_ids=ids)
    (pkg / VOCABULARY_FILE).write_text(json.dumps(ids[:-1]))
    with pytest.raises(IntegrityError, match=f"{VOCABULARY_FILE}: .*(bytes|sha256)"):  # its size or digest
        DevicePackage.load(pkg)
    with pytest.raises(IntegrityError, match="unique"):
        ItemVocabulary(["", "a", "a"])
