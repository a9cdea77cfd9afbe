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
    "PersistentVolumeClaim": "V1PersistentVolumeClaim", "ServiceAccount": "V1ServiceAccount",
    "NetworkPolicy": "V1NetworkPolicy", "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
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


def _one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for _, d in _documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def _arg(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def test_there_are_a_job_and_the_serving_manifests():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == sorted(["Job", "Job", "PersistentVolumeClaim", "ServiceAccount", "Namespace", "ResourceQuota",
                            "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                            "HorizontalPodAutoscaler"])  # fmt: skip
    serve = sorted(p.name for p in (ROOT / "k8s-job" / "serve").glob("*.yaml"))
    assert [name[:2] for name in serve] == ["00", "01", "02", "03", "04", "05", "06"]  # the order they are applied


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
    spec = _one("Job", "esm2cli-embed")["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {v["name"]: v for v in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["ESM2CLI_SHARD_COUNT"]["value"]) == spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1 and pod["restartPolicy"] == "Never"
    assert pod["runtimeClassName"] == "nvidia" and pod["tolerations"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/tmp"} <= mounts and env["HF_HOME"]["value"].startswith("/tmp")


def test_job_reaches_s3_through_workload_identity_with_static_keys_as_an_optional_fallback():
    pod = _one("Job", "esm2cli-embed")["spec"]["template"]["spec"]
    account = _one("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    env = {v["name"]: v for v in pod["containers"][0]["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "esm2cli-s3" and ref["optional"] is True  # the pod starts without the Secret


def test_job_model_is_fetched_once_and_mounted_read_only():
    fetch = _one("Job", "esm2cli-fetch-model")["spec"]["template"]["spec"]
    embed = _one("Job", "esm2cli-embed")["spec"]["template"]["spec"]
    fetch_args, embed_args = fetch["containers"][0]["args"], embed["containers"][0]["args"]
    assert fetch_args[:2] == ["download", "esm2_t33_650M"]
    assert _arg(embed_args, "--model") == f"{_arg(fetch_args, '--to')}/esm2_t33_650M_UR50D"  # where --to puts it
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in fetch["volumes"]}
    (mount,) = [
        m for m in embed["containers"][0]["volumeMounts"] if _arg(embed_args, "--model").startswith(m["mountPath"])
    ]
    (volume,) = [v for v in embed["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert volume["persistentVolumeClaim"]["claimName"] in claim.values()
    env = {v["name"]: v.get("value") for v in embed["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"


def _pods():
    for path, doc in _documents():
        if doc["kind"] in ("Job", "Deployment"):
            yield path, doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("path, pod", list(_pods()), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_every_pod_is_hardened(path, pod):
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts  # the root filesystem is read-only: /tmp is a volume
        resources = container["resources"]
        assert resources["requests"]["ephemeral-storage"] and resources["limits"]["ephemeral-storage"]
    for volume in pod["volumes"]:
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), volume["name"]  # no unbounded scratch space


def test_quota_bounds_ephemeral_storage():
    hard = _one("ResourceQuota")["spec"]["hard"]
    assert "requests.ephemeral-storage" in hard and "limits.ephemeral-storage" in hard


def test_server_reads_api_keys_from_a_secret_and_does_not_bind_every_address():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    key_file = _arg(container["args"], "--api-key-file")
    (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"]
    assert key_file.removeprefix(mount["mountPath"] + "/") in [i["path"] for i in volume["secret"]["items"]]
    assert "--host" not in container["args"] and "--api-key" not in container["args"]  # no key in the spec
    env = {v["name"]: v for v in container["env"]}
    assert env["ESM2CLI_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_network_policy_selects_the_server_and_opens_only_its_port():
    policy = _one("NetworkPolicy")["spec"]
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for rule in policy["ingress"]:
        assert rule["from"] and {p["port"] for p in rule["ports"]} <= ports  # never open to every source


def test_autoscaler_uses_a_metric_the_server_exports_with_a_cpu_fallback():
    from esm2cli.serve.metrics import ServerMetrics

    hpa = _one("HorizontalPodAutoscaler")["spec"]
    deployment = _one("Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    exported = {m.name for m in ServerMetrics().registry.collect()}
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods and all(p["metric"]["name"] in exported for p in pods)
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"])
    quota_gpus = int(_one("ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"])
    assert hpa["minReplicas"] <= hpa["maxReplicas"] <= quota_gpus
    readme = (ROOT / "k8s-job" / "README.md").read_text()
    assert all(f"seriesQuery: '{p['metric']['name']}" in readme for p in pods)  # the adapter rule is documented


def test_dockerfile_pins_the_base_digest_and_installs_with_constraints():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_DIGEST$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}@\$\{BASE_DIGEST\}$", dockerfile, re.M)
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and "torch==" not in line]
    assert installs and all("-c constraints.txt" in line or "--no-deps" in line for line in installs)
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text()


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
