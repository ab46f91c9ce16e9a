"""The deployment notes in docs/: their manifests parse and name code that exists, and every
ParamCast command line they show parses with the CLI."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def _documents() -> dict[str, list]:
    return {str(p.relative_to(DOCS)): list(yaml.safe_load_all(p.read_text())) for p in sorted(DOCS.rglob("*.yaml"))}


def _attr(path: str):
    module, _, name = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_manifest_parses():
    docs = _documents()
    assert {"kuberay/rayservice.yaml", "ray/cluster.yaml"} <= set(docs)
    for name, parts in docs.items():
        assert parts and all(isinstance(p, dict) for p in parts), name


def test_the_rayservice_deploys_paramcast_behind_the_grpc_proxy():
    service, grpc_service = _documents()["kuberay/rayservice.yaml"]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])  # a YAML document inside the manifest
    options = serve["grpc_options"]
    assert callable(_attr(options["grpc_servicer_functions"][0]))
    (app,) = serve["applications"]
    assert app["import_path"] == "paramcast.cloud.service.ray_serve:app_builder"
    assert grpc_service["kind"] == "Service" and grpc_service["spec"]["ports"][0]["targetPort"] == options["port"]
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in pods:
        (container,) = group["template"]["spec"]["containers"]
        assert options["port"] in [p["containerPort"] for p in container["ports"]]
        assert {"name": "PARAMCAST_MAX_REQUEST_BYTES", "value": "65536"} in container["env"]
    pytest.importorskip("ray", reason="the application's args are checked by building it")
    _attr(app["import_path"])(app["args"])  # raises on unknown or bad args


def test_the_cluster_config_starts_ray_on_every_machine():
    (config,) = _documents()["ray/cluster.yaml"]
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == config["min_workers"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    assert any("[ray]" in c for c in config["setup_commands"])


def _command_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def test_every_paramcast_command_in_the_notes_parses():
    from paramcast.cli import build_parser

    parser = build_parser()
    seen = 0
    for line in _command_lines((DOCS / "scale-out.md").read_text()):
        words = shlex.split(line)
        if words[0] == "paramcast":
            argv = words[1:]
        elif "paramcast.cli" in words:  # torchrun ... -m paramcast.cli train ...
            argv = words[words.index("paramcast.cli") + 1:]
        else:
            continue
        parser.parse_args(argv)  # exits (fails the test) on an unknown flag or a bad value
        seen += 1
    assert seen >= 6
