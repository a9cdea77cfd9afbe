"""The Kubernetes manifests parse as their kinds, and their image, command and arguments match the CLI."""

import re
from pathlib import Path

import click
import pytest
import yaml
from kubernetes.client import ApiClient

from esm2cli import __version__
from esm2cli.cli import cli

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "k8s-job").rglob("*.yaml"))
KINDS = {
    "Job": "V1Job", "Deployment": "V1Deployment", "Service": "V1Service", "Namespace": "V1Namespace",
    "ResourceQuota": "V1ResourceQuota", "PodDisruptionBudget": "V1PodDisruptionBudget",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim",
}  # fmt: skip


def _documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _drop_empty(value):
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


@pytest.mark.parametrize("path, doc", list(_documents()), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_manifest_validates_as_its_kind(path, doc):
    client = ApiClient()
    model = client._ApiClient__deserialize(doc, KINDS[doc["kind"]])  # raises on missing required fields
    # Every field must survive the round trip: a misspelt or misplaced key would be dropped.
    assert _drop_empty(client.sanitize_for_serialization(model)) == _drop_empty(yaml.safe_load(yaml.safe_dump(doc)))


def _containers():
    for path, doc in _documents():
        if doc["kind"] in ("Job", "Deployment"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield path, doc, container


def test_there_are_a_job_and_the_serving_manifests():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == sorted(["Job", "PersistentVolumeClaim", "Namespace", "ResourceQuota", "Deployment", "Service",
                            "PodDisruptionBudget"])  # fmt: skip
    serve = sorted(p.name for p in (ROOT / "k8s-job" / "serve").glob("*.yaml"))
    assert [name[:2] for name in serve] == ["00", "01", "02", "03", "04"]  # the order they are applied in


def test_images_and_commands_match_the_dockerfile_and_cli():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["esm2cli"\]$', dockerfile, re.M)
    image = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert image == f"esm2cli:{__version__}"
    for _, _, container in _containers():
        assert container["image"] == image
        assert "command" not in container  # the image's entrypoint, esm2cli, runs the args
        args = container["args"]
        command = cli.commands[args[0]]
        command.make_context(args[0], list(args[1:]), parent=click.Context(cli))  # unknown options raise


def test_environment_variables_are_ones_the_cli_reads():
    known = set()
    for command in cli.commands.values():
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
            known.update(e for e in envvars if e)
    for _, _, container in _containers():
        for var in container.get("env", []):
            if var["name"].startswith("ESM2CLI_"):
                assert var["name"] in known, var["name"]


def test_job_shards_match_completions_and_gpus_are_requested():
    job = next(doc for _, doc in _documents() if doc["kind"] == "Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {v["name"]: v for v in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["ESM2CLI_SHARD_COUNT"]["value"]) == spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1 and pod["restartPolicy"] == "Never"
    assert pod["runtimeClassName"] == "nvidia" and pod["tolerations"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "esm2cli-s3"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/cache"} <= mounts and env["HF_HOME"]["value"].startswith("/cache")


def test_serving_probes_use_health_and_live():
    deployment = next(doc for _, doc in _documents() if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    args = container["args"]
    graceful = float(args[args.index("--graceful-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > graceful
