"""The Kubernetes manifests, rendered from each overlay, parse as their kinds and match the CLI and the image."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.utils import parse_quantity
from kustomize_lite import render

from esm2cli import __version__
from esm2cli.cli import cli

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s-job"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
RENDERED = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
KINDS = {
    "Job": "V1Job", "Deployment": "V1Deployment", "Service": "V1Service", "Namespace": "V1Namespace",
    "ResourceQuota": "V1ResourceQuota", "PodDisruptionBudget": "V1PodDisruptionBudget",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim", "ServiceAccount": "V1ServiceAccount",
    "NetworkPolicy": "V1NetworkPolicy", "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
    "ConfigMap": "V1ConfigMap",
}  # fmt: skip


@pytest.fixture(params=OVERLAYS)
def docs(request) -> list[dict]:
    """The objects one overlay renders to."""
    return RENDERED[request.param]


def _overlay(name: str) -> dict:
    return yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())


def _drop_empty(value):
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


@pytest.mark.parametrize(
    "overlay, doc", [(name, doc) for name in OVERLAYS for doc in RENDERED[name]],
    ids=lambda x: x if isinstance(x, str) else f"{x['kind']}-{x['metadata']['name']}",
)  # fmt: skip
def test_manifest_validates_as_its_kind(overlay, doc):
    client = ApiClient()
    model = client._ApiClient__deserialize(doc, KINDS[doc["kind"]])  # raises on missing required fields
    # Every field must survive the round trip: a misspelt or misplaced key would be dropped.
    assert _drop_empty(client.sanitize_for_serialization(model)) == _drop_empty(yaml.safe_load(yaml.safe_dump(doc)))


def _containers(docs):
    for doc in docs:
        if doc["kind"] in ("Job", "Deployment"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def _one(docs, kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def _config_env(docs, container: dict) -> dict[str, str]:
    """The variables a container gets from ConfigMaps through envFrom."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def _arg(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def test_there_are_the_jobs_and_the_serving_manifests(docs):
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(["Job", "Job", "PersistentVolumeClaim", "ServiceAccount", "Namespace", "ResourceQuota",
                            "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                            "HorizontalPodAutoscaler"])  # fmt: skip


def test_the_overlay_sets_namespace_image_and_bucket_in_one_place():
    for name in OVERLAYS:
        overlay, docs = _overlay(name), RENDERED[name]
        (image,) = overlay["images"]
        for doc in docs:  # the namespace: its own object's name, every other object's namespace
            assert doc["metadata"].get("namespace", doc["metadata"]["name"]) == overlay["namespace"]
        for _, container in _containers(docs):
            assert container["image"] == f"{image['newName']}:{image['newTag']}"
        assert image["newTag"] == __version__  # the tag `make image` builds
        (generator,) = overlay["configMapGenerator"]
        literals = dict(line.split("=", 1) for line in generator["literals"])
        embed = _one(docs, "Job", "esm2cli-embed")["spec"]["template"]["spec"]["containers"][0]
        assert _config_env(docs, embed) == literals  # the bucket and prefix, from this file only
    for path in (K8S / "base").glob("*.yaml"):  # no base file names the namespace, a registry or a bucket
        text = path.read_text()
        assert "s3://" not in text, path
        assert "namespace: esm2cli" not in text or path.name == "kustomization.yaml", path


def test_the_bucket_is_named_in_one_place_per_overlay():
    for name in OVERLAYS:  # what an overlay renders from: base/ and its own folder
        files = [*(K8S / "base").glob("*.yaml"), *(K8S / "overlays" / name).glob("*.yaml")]
        naming = {path: text.count("s3://") for path in files if (text := path.read_text()).count("s3://")}
        assert list(naming) == [K8S / "overlays" / name / "kustomization.yaml"], naming
        (generator,) = _overlay(name)["configMapGenerator"]
        urls = [line for line in generator["literals"] if "s3://" in line]
        assert [url.split("=")[0] for url in urls] == ["ESM2CLI_INPUT", "ESM2CLI_OUTPUT"]
        assert sum(naming.values()) == len(urls)  # the two settings, and nothing else naming the bucket


def test_aws_overlay_uses_irsa_and_aws_s3_and_minio_overlay_its_endpoint():
    aws, minio = RENDERED["aws"], RENDERED["minio"]
    account = _one(aws, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    aws_env = _config_env(aws, _one(aws, "Job", "esm2cli-embed")["spec"]["template"]["spec"]["containers"][0])
    assert "ESM2CLI_S3_ENDPOINT_URL" not in aws_env  # AWS S3 itself
    assert _one(aws, "PersistentVolumeClaim")["spec"]["storageClassName"]  # EBS (the default) is not RWX
    minio_env = _config_env(minio, _one(minio, "Job", "esm2cli-embed")["spec"]["template"]["spec"]["containers"][0])
    assert minio_env["ESM2CLI_S3_ENDPOINT_URL"].startswith("http")
    assert "annotations" not in _one(minio, "ServiceAccount")["metadata"]
    for docs, runtime in ((aws, None), (minio, "nvidia")):  # EKS's default runtime is NVIDIA's; the Operator's is not
        for doc in docs:
            if doc["kind"] in ("Job", "Deployment") and doc["metadata"]["name"] != "esm2cli-fetch-model":
                assert doc["spec"]["template"]["spec"].get("runtimeClassName") == runtime


def test_images_and_commands_match_the_dockerfile_and_cli(docs, monkeypatch):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["esm2cli"\]$', dockerfile, re.M)
    image = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert image == f"esm2cli:{__version__}"
    base = render(K8S / "base")
    assert {c["image"] for _, c in _containers(base)} == {image}  # what the overlays' `images:` rename
    for _, container in _containers(docs):
        assert "command" not in container  # the image's entrypoint, esm2cli, runs the args
        for name in [n for n in os.environ if n.startswith("ESM2CLI_")]:
            monkeypatch.delenv(name)
        for name, value in _config_env(docs, container).items():
            monkeypatch.setenv(name, value)
        for var in container.get("env", []):
            if "value" in var:
                monkeypatch.setenv(var["name"], var["value"])
        args = container["args"]
        command = cli.commands[args[0]]
        ctx = command.make_context(args[0], list(args[1:]), parent=click.Context(cli))  # unknown options raise
        if args[0] == "embed":  # the FASTA and the output come from the ConfigMap
            assert str(ctx.params["fasta"]).startswith("s3://") and str(ctx.params["output"]).startswith("s3://")


def test_environment_variables_are_ones_the_cli_reads(docs):
    known = set()
    for command in cli.commands.values():
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
            known.update(e for e in envvars if e)
    for _, container in _containers(docs):
        names = [var["name"] for var in container.get("env", [])] + list(_config_env(docs, container))
        for name in names:
            if name.startswith("ESM2CLI_"):
                assert name in known, name


def test_job_shards_match_completions_and_gpus_are_requested(docs):
    spec = _one(docs, "Job", "esm2cli-embed")["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {v["name"]: v for v in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["ESM2CLI_SHARD_COUNT"]["value"]) == spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1 and pod["restartPolicy"] == "Never"
    assert pod["tolerations"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/tmp"} <= mounts and env["HF_HOME"]["value"].startswith("/tmp")


def test_job_reaches_s3_through_workload_identity_with_static_keys_as_an_optional_fallback(docs):
    pod = _one(docs, "Job", "esm2cli-embed")["spec"]["template"]["spec"]
    account = _one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    env = {v["name"]: v for v in pod["containers"][0]["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "esm2cli-s3" and ref["optional"] is True  # the pod starts without the Secret


def test_job_model_is_fetched_once_and_mounted_read_only(docs):
    fetch = _one(docs, "Job", "esm2cli-fetch-model")["spec"]["template"]["spec"]
    embed = _one(docs, "Job", "esm2cli-embed")["spec"]["template"]["spec"]
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
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes mount it at once


def _pods():
    for name in OVERLAYS:
        for doc in RENDERED[name]:
            if doc["kind"] in ("Job", "Deployment"):
                yield f"{name}-{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("name, pod", list(_pods()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_pod_is_hardened(name, pod):
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


def test_quota_bounds_ephemeral_storage(docs):
    hard = _one(docs, "ResourceQuota")["spec"]["hard"]
    assert "requests.ephemeral-storage" in hard and "limits.ephemeral-storage" in hard


def _pod_totals(pod: dict, count: int) -> dict[str, float]:
    """What `count` copies of a pod take from a ResourceQuota, by quota key."""
    totals = {"pods": count}
    for container in pod["containers"]:
        for kind in ("requests", "limits"):
            for resource, quantity in container["resources"].get(kind, {}).items():
                key = f"{kind}.{resource}"
                totals[key] = totals.get(key, 0) + count * float(parse_quantity(quantity))
    return totals


def test_quota_holds_the_embed_job_and_the_server_at_their_maximum_together(docs):
    """The embed Job at full parallelism, the fetch-model Job and the server at the autoscaler's maximum
    plus its rolling-update surge, all at once, within the namespace's quota."""
    hard = {key: float(parse_quantity(value)) for key, value in _one(docs, "ResourceQuota")["spec"]["hard"].items()}
    embed, fetch = _one(docs, "Job", "esm2cli-embed"), _one(docs, "Job", "esm2cli-fetch-model")
    serve, hpa = _one(docs, "Deployment"), _one(docs, "HorizontalPodAutoscaler")
    serve_pods = hpa["spec"]["maxReplicas"] + serve["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    parts = [
        _pod_totals(embed["spec"]["template"]["spec"], embed["spec"]["parallelism"]),
        _pod_totals(fetch["spec"]["template"]["spec"], fetch["spec"].get("parallelism", 1)),
        _pod_totals(serve["spec"]["template"]["spec"], serve_pods),
    ]
    for key, limit in hard.items():
        used = sum(part.get(key, 0) for part in parts)
        assert used <= limit, f"{key}: {used} > {limit}"
    for key in set().union(*parts):  # every resource the pods ask for is bounded (cpu limits aside)
        assert key in hard or key in ("limits.cpu", "limits.nvidia.com/gpu"), key
    assert parts[0]["requests.nvidia.com/gpu"] < hard["requests.nvidia.com/gpu"]  # the Job leaves GPUs to serve


def test_server_reads_api_keys_from_a_secret_and_does_not_bind_every_address(docs):
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    key_file = _arg(container["args"], "--api-key-file")
    (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"]
    assert key_file.removeprefix(mount["mountPath"] + "/") in [i["path"] for i in volume["secret"]["items"]]
    assert "--host" not in container["args"] and "--api-key" not in container["args"]  # no key in the spec
    env = {v["name"]: v for v in container["env"]}
    assert env["ESM2CLI_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_network_policy_selects_the_server_and_opens_only_its_port(docs):
    policy = _one(docs, "NetworkPolicy")["spec"]
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for rule in policy["ingress"]:
        assert rule["from"] and {p["port"] for p in rule["ports"]} <= ports  # never open to every source


def test_autoscaler_uses_a_metric_the_server_exports_with_a_cpu_fallback(docs):
    from esm2cli.serve.metrics import ServerMetrics

    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    deployment = _one(docs, "Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    exported = {m.name for m in ServerMetrics().registry.collect()}
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods and all(p["metric"]["name"] in exported for p in pods)
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"])
    assert hpa["minReplicas"] <= hpa["maxReplicas"]  # the quota holds the maximum: test_quota_holds_...
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


def test_image_has_hdf5():
    """`-o out.h5` works in the image: the dependencies layer installs the [h5] extra, and the build checks it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (deps,) = [line for line in dockerfile.splitlines() if "pip install -c constraints.txt" in line]
    assert re.search(r"\.\[[^\]]*\bh5\b[^\]]*\]", deps), deps
    assert re.search(r"^RUN .*python -c \"import h5py\"", dockerfile, re.M)
    assert re.search(r"^h5py==", (ROOT / "constraints.txt").read_text(), re.M)  # the version the image gets


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["../base"] + OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    directory = (K8S / "overlays" / overlay).resolve()
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    def key(doc):
        return doc["kind"], doc["metadata"]["name"]

    theirs = sorted(yaml.safe_load_all(done.stdout), key=key)
    assert theirs == sorted(render(directory), key=key)


def test_serving_probes_use_health_and_live(docs):
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    args = container["args"]
    graceful = float(args[args.index("--graceful-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > graceful
