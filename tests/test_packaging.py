"""Deployment files against their published schemas, and pyproject.toml against the imports.

No Docker engine or cluster here: compose.yaml is checked against the Compose
Specification's JSON schema (as vendored by check-jsonschema), the Kubernetes
manifests against the Kubernetes schemas kubernetes-validate bundles, strictly
(an unknown field fails), and the KEDA ScaledObject against KEDA's own CRD
schema (tests/schemas, copied unchanged from a KEDA release).
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.resources
import importlib.util
import json
import sys
import tomllib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import REPO_ROOT

KUBERNETES_VERSION = "1.37.0"
MANIFESTS = ["dispatcher/deployment.yaml", "workers/deployment.yaml"]
KEDA_CRD = REPO_ROOT / "tests" / "schemas" / "keda.sh_scaledobjects-v2.20.2.yaml"


def _compose_validator() -> jsonschema.protocols.Validator:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendored / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


@pytest.mark.unit
def test_compose_file_follows_the_compose_specification() -> None:
    validator = _compose_validator()
    compose = _compose()
    assert list(validator.iter_errors(compose)) == []
    # The validator does reject what Compose would.
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["restart_policy"] = "always"  # a misplaced key
    assert list(validator.iter_errors(broken))


@pytest.mark.unit
def test_compose_redis_is_durable_and_livekit_reachable_from_containers() -> None:
    services = _compose()["services"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--appendfsync") + 1] == "everysec"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert "/data" in services["redis"]["volumes"][0]
    livekit = services["livekit"]["command"]
    # An explicit node IP replaces every ICE candidate; 127.0.0.1 would send a
    # worker container's media to itself.
    assert "--node-ip" not in livekit
    config = yaml.safe_load(livekit[livekit.index("--config-body") + 1])
    assert config["rtc"] == {"use_external_ip": False, "enable_loopback_candidate": True}
    for worker in (s for name, s in services.items() if name.startswith("worker-")):
        assert worker["environment"]["LIVEKIT_URL"] == "ws://livekit:7880"


def _documents(path: str) -> list[dict[str, Any]]:
    text = (REPO_ROOT / path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.unit
@pytest.mark.parametrize("path", MANIFESTS)
def test_kubernetes_manifests_follow_the_kubernetes_schemas_strictly(path: str) -> None:
    for resource in _documents(path):
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        broken = copy.deepcopy(resource)
        broken["spec" if "spec" in broken else "data"]["replica"] = 2  # unknown field
        if resource["kind"] == "ConfigMap":
            broken = {**resource, "date": {}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD's structural schema as the API server applies it to a typed object:
    unknown fields are errors (kubectl's strict field validation), except where
    the schema keeps them (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.mark.unit
def test_keda_scaled_object_follows_kedas_crd() -> None:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft4Validator(schema)
    (scaled,) = (d for d in _documents("workers/scaledobject.yaml") if d["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    assert scaled["kind"] == crd["spec"]["names"]["kind"]
    # metadata is the API server's (ObjectMeta), checked by its schema elsewhere.
    assert list(validator.iter_errors(scaled)) == []
    # The scaler reads the stream the dispatcher writes (its length: why, in
    # tests/test_autoscaling.py).
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["stream"] == "openrtc:jobs:dental"
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicaCont"] = 1
    assert list(validator.iter_errors(broken))
    # The PodDisruptionBudget beside it is plain Kubernetes. (No schema of KEDA's
    # TriggerAuthentication is vendored here.)
    (budget,) = (
        d for d in _documents("workers/scaledobject.yaml") if d["kind"] == "PodDisruptionBudget"
    )
    kubernetes_validate.validate(budget, KUBERNETES_VERSION, strict=True)


# -- pyproject.toml ---------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _names(requirements: list[Any], groups: dict[str, list[Any]]) -> set[str]:
    names = set()
    for item in requirements:
        if isinstance(item, dict):
            names |= _names(groups[item["include-group"]], groups)
        else:
            names.add(canonicalize_name(Requirement(item).name))
    return names


def _distributions_imported_by(folder: str) -> dict[str, set[str]]:
    """Distribution name -> the modules the folder's code imports from it."""
    by_top = importlib.metadata.packages_distributions()
    files: dict[str, set[str]] = {}

    def owner(top: str, origin: str) -> str | None:
        # Only the distributions that provide this top-level name (several share
        # the `livekit` namespace): which one holds the module's file.
        for name in by_top.get(top, []):
            if name not in files:
                dist = importlib.metadata.distribution(name)
                files[name] = {str(dist.locate_file(f)) for f in dist.files or ()}
            if origin in files[name]:
                return canonicalize_name(name)
        return None

    imported: dict[str, set[str]] = {}
    for path in (REPO_ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [[alias.name] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from livekit import rtc`: the submodule, else the package.
                candidates = [[f"{node.module}.{a.name}", node.module] for a in node.names]
            else:
                continue
            for names in candidates:
                top = names[0].split(".")[0]
                if top in sys.stdlib_module_names or top in ("openrtc", "tests"):
                    continue
                origin = None
                for name in names:
                    try:
                        spec = importlib.util.find_spec(name)
                    except ModuleNotFoundError:
                        spec = None
                    if spec is not None and spec.origin not in (None, "namespace"):
                        origin = spec.origin
                        break
                assert origin is not None, f"{path}: cannot find {names[0]}"
                dist = owner(top, origin) or f"<no distribution: {names[0]}>"
                imported.setdefault(dist, set()).add(names[0])
    return imported


def test_the_package_declares_every_distribution_it_imports() -> None:
    project = _pyproject()["project"]
    declared = _names(project["dependencies"], {})
    optional = {
        name
        for extra in project.get("optional-dependencies", {}).values()
        for name in _names(extra, {})
    }
    imported = _distributions_imported_by("openrtc")
    assert {"rich", "aiohttp", "protobuf", "livekit-agents"} <= imported.keys()
    missing = {d: sorted(m) for d, m in imported.items() if d not in declared | optional}
    assert missing == {}, "add these to [project.dependencies] (or an extra)"


def test_the_tests_declare_every_distribution_they_import() -> None:
    data = _pyproject()
    groups = data["dependency-groups"]
    declared = _names(data["project"]["dependencies"], {}) | _names(groups["test"], groups)
    imported = _distributions_imported_by("tests")
    missing = {d: sorted(m) for d, m in imported.items() if d not in declared}
    assert missing == {}, "add these to the test dependency group"


def test_dev_tools_are_dependency_groups_and_the_licence_is_shipped() -> None:
    data = _pyproject()
    groups = data["dependency-groups"]
    assert {"pytest", "ruff", "mypy"} <= _names(groups["dev"], groups)
    assert "dev" not in data["project"].get("optional-dependencies", {})
    assert _names(data["project"]["optional-dependencies"]["hiredis"], {}) == {"redis"}
    assert "hiredis" in data["project"]["optional-dependencies"]["hiredis"][0]
    assert data["project"]["license"] == "MIT"
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")
