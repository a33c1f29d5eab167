"""Deployment files stay true to the code: every YAML parses, entrypoints and import paths resolve,
flags and Serve args are accepted, and the cluster config passes the launcher's validation."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
YAMLS = sorted(
    [ROOT / "cluster.yaml", ROOT / "serve_apps/config.yaml", *(ROOT / "infra/k8s").glob("*.yaml")]
)


def _docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    assert _docs(path), f"{path} is empty"


def _kinds() -> dict[str, dict]:
    return {d["kind"]: d for p in (ROOT / "infra/k8s").glob("*.yaml") for d in _docs(p)}


def test_k8s_manifests_have_the_expected_kinds():
    kinds = _kinds()
    for kind in ("RayCluster", "RayJob", "RayService", "Deployment", "Service", "ConfigMap"):
        assert kind in kinds, f"no {kind} in infra/k8s"
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert kinds[kind]["apiVersion"] == "ray.io/v1"


def test_rayservice_probes_point_at_the_apps_readiness_and_liveness_routes():
    """Every Serve pod's readiness probe asks /readyz (a model replica can answer), its
    liveness probe (where set) /healthz, on the Serve port; both are routes of the app."""
    from timeexpert.serve.app import fastapi_app

    routes = set(fastapi_app.openapi()["paths"])
    spec = _kinds()["RayService"]["spec"]
    port = yaml.safe_load(spec["serveConfigV2"])["http_options"]["port"]
    groups = [spec["rayClusterConfig"]["headGroupSpec"]] + spec["rayClusterConfig"]["workerGroupSpecs"]
    probes = []
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            ready = container["readinessProbe"]["httpGet"]
            probes.append(ready)
            assert ready["path"] == "/readyz", container["name"]
            if "livenessProbe" in container:
                probes.append(container["livenessProbe"]["httpGet"])
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["port"] for p in probes} == {port}
    assert {p["path"] for p in probes} <= routes


def _entrypoint_argv(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    return argv[1:]


def test_rayjob_entrypoint_exists_and_accepts_its_flags(monkeypatch):
    argv = _entrypoint_argv(_kinds()["RayJob"]["spec"]["entrypoint"])
    script = ROOT / argv[0]
    assert script.is_file(), f"RayJob entrypoint {argv[0]} does not exist"
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location("rayjob_entry", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # --list-presets parses (and so validates) every flag, then lists presets without training.
    assert module.main(argv[1:] + ["--list-presets"]) == 0
    preset = argv[argv.index("--preset") + 1]
    from timeexpert.presets import list_presets

    assert preset in list_presets()


def _serve_apps(config: dict) -> list[dict]:
    return config["applications"]


@pytest.mark.parametrize(
    "source",
    ["serve_apps/config.yaml", "infra/k8s/rayservice.yaml"],
)
def test_serve_configs_resolve_and_validate(source, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from timeexpert.serve.settings import ServiceConfig

    monkeypatch.syspath_prepend(str(ROOT))
    doc = _docs(ROOT / source)[0]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    ServeDeploySchema.model_validate(config)  # Serve's own schema
    for app in _serve_apps(config):
        module_name, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module_name), attr)
        args = ServiceConfig.model_validate(app["args"])  # every arg known and valid
        assert args.model.checkpoint
        assert callable(builder)
        known = {"GroundingModel", "VideoDecoder", "GroundingIngress"}
        assert {d["name"] for d in app.get("deployments", [])} <= known


def test_cluster_yaml_passes_launcher_validation():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    assert config["head_node_type"] in config["available_node_types"]
    bad = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad["available_node_types"]["head.cpu"]["bogus_field"] = 1
    with pytest.raises(Exception, match="bogus_field"):
        validate_config(fillout_defaults(bad))


def test_dockerfile_copies_what_exists():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[2:-1] if "--chown" in line else line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    # nothing secret baked in: no credential assigned in ENV/ARG lines
    for line in text.splitlines():
        if line.split()[:1] in (["ENV"], ["ARG"]):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)\w*\s*=", line), line
