"""The Kubernetes manifests (k8s/), checked without a cluster.

Every overlay is rendered by tests/k8s/kustomize.py (the subset of kustomize k8s/ uses; compared
with `kustomize build` / `kubectl kustomize` when one is installed), then:
- built-in objects are validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
  unknown fields are errors) for the oldest and newest Kubernetes versions we support;
- Strimzi's custom resources, whose schemas are not in it, get their required fields checked by hand;
- cross-references: Service/PDB/HPA targets, Secret/ConfigMap/PVC/ServiceAccount references, probes
  against the routes the app really serves, container args parsed by `feedloop`'s own argparse
  parser, images against the kustomization and the Dockerfile, FEEDLOOP_* variables against
  serving/settings.py, topics against feedback/topics.py, the metric the HPAs scale on against
  serving/metrics.py.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import yaml

from tests.k8s.kustomize import BUILTIN_GROUPS, build, group_of, pod_containers, pod_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# Kubernetes versions the manifests must be valid for: 1.30 is the first with the preStop `sleep`
# action on by default; the newest is the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")

FEEDLOOP_IMAGE = "feedloop"  # the name manifests use; each overlay's `images:` points it at a registry
STRIMZI_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic"}
# Third-party images, each pinned to a tag (never latest).
THIRD_PARTY_IMAGES = {"ghcr.io/huggingface/text-generation-inference", "postgres"}
# Objects an overlay refers to that are deliberately not in it: created by the operator before the
# first apply (docs/deploy.md, "Secrets"), with the keys the pods read.
EXPECTED_EXTERNAL = {
    "dev": {},
    "prod": {("Secret", "feedloop-secrets"): {"FEEDLOOP_DATABASE_URL", "FEEDLOOP_ADMIN_TOKEN"}},
}
# FEEDLOOP_* variables the manifests set that are not (yet) fields of serving/settings.py, with why.
SETTINGS_NOT_IN_SERVING_SETTINGS = {
    "FEEDLOOP_UPSTREAMS": "the gateway's upstream pools (issue 6, items 1-2: read by the upstream engines)",
}
# TGI's own GET routes (its router's OpenAPI: /health, /info, /metrics), for the TGI probes.
TGI_GET_ROUTES = {"/health", "/info", "/metrics"}
# The only containers of the feedloop image that run something other than `feedloop …`.
NON_FEEDLOOP_COMMANDS = {"wait-for-model"}
GPU = "nvidia.com/gpu"
CHECKPOINTS_CLAIM = "feedloop-checkpoints"
CHECKPOINTS_PATH = "/checkpoints"


# ---------------------------------------------------------------------------------------------- helpers

@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(build(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict]:
    return list(_rendered(overlay))


def of_kind(overlay: str, kind: str) -> list[dict]:
    return [o for o in rendered(overlay) if o["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> dict | None:
    return next((o for o in of_kind(overlay, kind) if o["metadata"]["name"] == name), None)


def workloads(overlay: str) -> list[dict]:
    return [o for o in rendered(overlay) if pod_spec(o) is not None]


def kustomization(overlay: str) -> dict:
    return yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())


def label_selector_matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def matching_workloads(overlay: str, selector: dict) -> list[dict]:
    return [w for w in workloads(overlay)
            if label_selector_matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))]


def config_value(overlay: str, ref: dict, kind: str) -> str | None:
    obj = named(overlay, kind, ref["name"])
    if obj is None:
        return None
    data = {**obj.get("data", {}), **obj.get("stringData", {})}
    return data.get(ref["key"])


def container_env(overlay: str, container: dict) -> dict[str, str | None]:
    """The container's environment as far as it is known here (None: from an external Secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = config_value(overlay, var["valueFrom"]["configMapKeyRef"], "ConfigMap")
        else:
            env[var["name"]] = None
    return env


def expand(value: str, env: dict[str, str | None]) -> str:
    """Kubernetes' $(VAR) expansion in command/args (only from variables the container defines)."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        assert name in env and env[name] is not None, f"$({name}) is not a variable this container defines"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def is_feedloop(container: dict, overlay: str) -> bool:
    return container["image"].split(":")[0] == feedloop_image(overlay).split(":")[0]


def feedloop_image(overlay: str) -> str:
    entry = next(i for i in kustomization(overlay)["images"] if i["name"] == FEEDLOOP_IMAGE)
    return f"{entry['newName']}:{entry['newTag']}"


def feedloop_containers(overlay: str) -> list[tuple[dict, dict]]:
    return [(w, c) for w in workloads(overlay) for c in pod_containers(w)
            if is_feedloop(c, overlay) and c.get("command") == ["feedloop"]]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@functools.cache
def feedloop_subcommands() -> frozenset[str]:
    from serving.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return frozenset(sub.choices)


@functools.cache
def app_get_routes() -> frozenset[str]:
    """The GET routes of the gateway's HTTP app (serving/http/app.py), from its route table."""
    from serving.http.app import create_app
    from serving.settings import ServingSettings

    app = create_app(SimpleNamespace(settings=ServingSettings()))  # builds routes only; loads nothing
    return frozenset(path for path, methods in app.openapi()["paths"].items() if "get" in methods)


def case_ids(overlay_cases):
    return [f"{o}:{w['metadata']['name']}/{c['name']}" for o, w, c in overlay_cases]


FEEDLOOP_CASES = [(o, w, c) for o in OVERLAYS for w, c in feedloop_containers(o)]


# ------------------------------------------------------------------------------------------- rendering

def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders(overlay):
    objects = rendered(overlay)
    assert objects
    namespace = kustomization(overlay)["namespace"]
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"] == [namespace]
    assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kustomize(overlay):
    """The Python renderer's output equals the real kustomize's, object by object."""
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: the Python renderer alone was used")
    out = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    def key(o):
        return group_of(o["apiVersion"]), o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]

    theirs = {key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    mine = {key(o): o for o in rendered(overlay)}
    assert set(mine) == set(theirs)
    for k in mine:
        assert mine[k] == theirs[k], f"{k} differs from {' '.join(command)}'s rendering"


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_the_kubernetes_schemas(overlay, version):
    import kubernetes_validate

    errors = []
    for obj in rendered(overlay):
        if obj["kind"] in STRIMZI_KINDS:
            continue
        assert group_of(obj["apiVersion"]) in BUILTIN_GROUPS, f"{obj['kind']}: a kind nothing here checks"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_resources(overlay):
    """What Strimzi requires of Kafka, KafkaNodePool and KafkaTopic (their CRDs are not in the schemas)."""
    kafkas = of_kind(overlay, "Kafka")
    assert len(kafkas) == 1
    kafka = kafkas[0]
    cluster = kafka["metadata"]["name"]
    assert kafka["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert kafka["metadata"]["annotations"] == {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"}
    spec = kafka["spec"]
    assert "zookeeper" not in spec, "KRaft: no ZooKeeper"
    listeners = spec["kafka"]["listeners"]
    assert listeners and all({"name", "port", "type", "tls"} <= set(li) for li in listeners)
    assert all(re.fullmatch(r"[a-z0-9]{1,11}", li["name"]) for li in listeners)
    assert "topicOperator" in spec["entityOperator"], "KafkaTopic resources need the topic operator"

    pools = of_kind(overlay, "KafkaNodePool")
    assert pools and all(p["apiVersion"] == "kafka.strimzi.io/v1beta2" for p in pools)
    for pool in pools:
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert pool["spec"]["replicas"] >= 1
        assert set(pool["spec"]["roles"]) <= {"controller", "broker"} and pool["spec"]["roles"]
        storage = pool["spec"]["storage"]
        assert storage["type"] in {"ephemeral", "persistent-claim", "jbod"}
        if storage["type"] == "jbod":
            assert storage["volumes"] and all(v["type"] in {"ephemeral", "persistent-claim"} for v in storage["volumes"])
        else:
            assert "volumes" not in storage
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    assert controllers % 2 == 1, "a KRaft quorum needs an odd number of controllers"
    assert brokers >= 1

    config = spec["kafka"].get("config", {})
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor"):
        assert config.get(key, 3) <= brokers, f"{key} > {brokers} brokers"
    assert config.get("min.insync.replicas", 1) <= config.get("default.replication.factor", 1)

    for topic in of_kind(overlay, "KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert topic["spec"]["partitions"] >= 1
        assert 1 <= topic["spec"]["replicas"] <= brokers
        assert topic["spec"]["config"]["min.insync.replicas"] <= topic["spec"]["replicas"]
        assert isinstance(topic["spec"]["config"]["retention.ms"], int)

    # The address every client is given is this cluster's bootstrap Service on a plain listener.
    bootstrap = named(overlay, "ConfigMap", "feedloop-config")["data"]["FEEDLOOP_KAFKA"]
    host, port = bootstrap.split(":")
    assert host == f"{cluster}-kafka-bootstrap"
    assert any(li["port"] == int(port) and li["tls"] is False and li["type"] == "internal" for li in listeners)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_topic_has_a_kafkatopic(overlay):
    from feedback import topics

    names = [t["spec"].get("topicName", t["metadata"]["name"]) for t in of_kind(overlay, "KafkaTopic")]
    assert sorted(names) == sorted(topics.ALL)


# ------------------------------------------------------------------------------------ cross-references

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_selectors_match_pods(overlay):
    for service in of_kind(overlay, "Service"):
        targets = matching_workloads(overlay, service["spec"]["selector"])
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in targets:
                ports = [p for c in pod_containers(workload) for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in ports), \
                    f"Service {service['metadata']['name']}: targetPort {target} is not a port of its pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_selectors_match_their_templates(overlay):
    for w in workloads(overlay):
        if "selector" in w["spec"]:
            assert label_selector_matches(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_and_hpas_target_real_workloads(overlay):
    from serving.metrics import ServingMetrics

    for pdb in of_kind(overlay, "PodDisruptionBudget"):
        assert matching_workloads(overlay, pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    protected = {w["metadata"]["name"] for pdb in of_kind(overlay, "PodDisruptionBudget")
                 for w in matching_workloads(overlay, pdb["spec"]["selector"]["matchLabels"])}
    assert {"feedloop-gateway", "feedloop-policy-worker", "feedloop-reward-worker"} <= protected

    exported = {m.name for m in ServingMetrics().registry.collect()}
    for hpa in of_kind(overlay, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = named(overlay, ref["kind"], ref["name"])
        assert target is not None, f"HPA {hpa['metadata']['name']} scales nothing"
        assert "replicas" not in target["spec"], f"{ref['name']}: its HPA owns replicas; an apply would reset them"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in exported, "the HPA's metric is not one serving exports"
    assert named(overlay, "HorizontalPodAutoscaler", "feedloop-gateway")["spec"]["metrics"][0]["pods"]["metric"][
        "name"] == "feedloop_queue_size"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_exist(overlay):
    """Every Secret, ConfigMap (and key), PVC and ServiceAccount a pod uses exists or is declared external."""
    external = EXPECTED_EXTERNAL[overlay]
    used_external = set()

    def check(kind: str, name: str, key: str | None, where: str) -> None:
        obj = named(overlay, kind, name)
        if obj is None:
            assert (kind, name) in external, f"{where}: {kind} {name} is neither in the overlay nor declared external"
            used_external.add((kind, name))
            assert key is None or key in external[(kind, name)], f"{where}: key {key} not declared for {kind} {name}"
            return
        if key is not None:
            assert key in {**obj.get("data", {}), **obj.get("stringData", {})}, f"{where}: {kind} {name} has no {key}"

    for w in workloads(overlay):
        spec = pod_spec(w)
        where = w["metadata"]["name"]
        if "serviceAccountName" in spec:
            check("ServiceAccount", spec["serviceAccountName"], None, where)
        for c in pod_containers(w, init=True):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    check("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], f"{where}/{var['name']}")
                if "configMapKeyRef" in ref:
                    check("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"], f"{where}/{var['name']}")
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    check("Secret", source["secretRef"]["name"], None, where)
                if "configMapRef" in source:
                    check("ConfigMap", source["configMapRef"]["name"], None, where)
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}, f"{where}/{c['name']}"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                check("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None, where)
            if "secret" in volume:
                check("Secret", volume["secret"]["secretName"], None, where)
            if "configMap" in volume:
                check("ConfigMap", volume["configMap"]["name"], None, where)
        if w["kind"] == "StatefulSet":
            service = named(overlay, "Service", w["spec"]["serviceName"])
            assert service is not None and service["spec"].get("clusterIP") == "None", "a StatefulSet needs a headless Service"
    assert used_external == set(external), "declared external but never used (or the reverse)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_feedloop_settings_in_env_are_real(overlay):
    """FEEDLOOP_* variables are fields of serving/settings.py, and the ConfigMap's values parse as them."""
    from serving.settings import ServingSettings

    fields = ServingSettings.model_fields
    names = set()
    for w in workloads(overlay):
        for c in pod_containers(w, init=True):
            names |= {n for n in container_env(overlay, c) if n.startswith("FEEDLOOP_")}
    for cm in of_kind(overlay, "ConfigMap"):
        names |= {n for n in cm["data"] if n.startswith("FEEDLOOP_")}
    for name in names:
        field = name.removeprefix("FEEDLOOP_").lower()
        assert field in fields or name in SETTINGS_NOT_IN_SERVING_SETTINGS, f"{name} is not a feedloop setting"
    config = named(overlay, "ConfigMap", "feedloop-config")["data"]
    settings = ServingSettings(**{k.removeprefix("FEEDLOOP_").lower(): v for k, v in config.items()})
    assert settings.kafka == config["FEEDLOOP_KAFKA"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_upstreams_point_at_services(overlay):
    """FEEDLOOP_UPSTREAMS parses with the gateway's own parser and names headless Services of this
    overlay, discovered by DNS: a ClusterIP Service would hide the pods behind one address, and the
    gateway could neither balance nor reload them one by one (a reload would land on a random pod)."""
    from serving.upstreams.config import parse_upstreams

    config = parse_upstreams(named(overlay, "ConfigMap", "feedloop-upstreams")["data"]["FEEDLOOP_UPSTREAMS"])
    specs = [*config.policy, *config.reward]
    assert config.reward, "the reward workers serve /v1/score"
    for spec in specs:
        url = urlparse(spec.url)
        service = named(overlay, "Service", url.hostname)
        assert service is not None, f"{spec.url}: no such Service"
        assert url.port in {p["port"] for p in service["spec"]["ports"]}, f"{spec.url}: not a port of the Service"
        assert spec.discovery == "dns", f"{spec.url}: the gateway must discover the pods (discovery: dns)"
        assert service["spec"].get("clusterIP") == "None", f"{url.hostname}: must be headless (one record per pod)"
        assert not service["spec"].get("publishNotReadyAddresses"), f"{url.hostname}: only ready pods may be members"
        kind = {"feedloop-tgi": "tgi"}.get(url.hostname, "feedloop")
        assert spec.kind == kind, f"{spec.url} is a {kind} upstream"
    assert config.tokenizer and config.tokenizer.startswith(CHECKPOINTS_PATH + "/")


@pytest.mark.parametrize("overlay,workload,container", FEEDLOOP_CASES, ids=case_ids(FEEDLOOP_CASES))
def test_commands_are_real_feedloop_commands(overlay, workload, container):
    """Each container's args parse with `feedloop`'s own parser (serving.cli.build_parser)."""
    from serving.cli import build_parser

    env = container_env(overlay, container)
    args = [expand(a, env) for a in container["args"]]
    if args[0] not in feedloop_subcommands():
        pytest.fail(f"`feedloop {args[0]}` is not a feedloop subcommand")
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`feedloop {' '.join(args)}` does not parse")
    # Servers listen on all interfaces (127.0.0.1, the default, would fail every probe and Service).
    port_flags = [f for f in ("--port", "--grpc-port", "--metrics-port") if f in args]
    declared = {p["containerPort"] for p in container.get("ports", [])}
    if port_flags:
        assert flag(args, "--host") == "0.0.0.0"
        assert {int(flag(args, f)) for f in port_flags} == declared, "containerPorts differ from the ports it opens"
    else:
        assert not declared
    if "--data-dir" in args:
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert parsed.data_dir in mounts, "the data directory must be a volume (the root filesystem is read-only)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_feedloop_image_runs_only_feedloop(overlay):
    """The feedloop image's containers run `feedloop …`, except the workers' wait-for-model init
    container, which must wait for the very model its worker loads."""
    for w in workloads(overlay):
        spec = pod_spec(w)
        for c in pod_containers(w, init=True):
            if not is_feedloop(c, overlay) or c.get("command") == ["feedloop"]:
                continue
            assert c["name"] in NON_FEEDLOOP_COMMANDS, f"{w['metadata']['name']}/{c['name']}: not `feedloop …`"
            waited = Path(c["command"][-1])
            models = set()
            for m in spec["containers"]:
                if "--model" in m.get("args", []):
                    models.add(flag(m["args"], "--model"))
                upstreams = container_env(overlay, m).get("FEEDLOOP_UPSTREAMS")
                if upstreams:
                    models.add(json.loads(upstreams).get("tokenizer"))
            assert waited.name == "manifest.json" and str(waited.parent) in models, \
                f"{w['metadata']['name']}/{c['name']} waits for {waited}, which its pod does not load"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_real_routes(overlay):
    """HTTP probes of feedloop servers hit GET routes of serving/http/app.py on the port they serve;
    the ingestor's and trainer's on their Prometheus port (which answers any path); TGI's on TGI's."""
    probes_seen = 0
    for w in workloads(overlay):
        for c in pod_containers(w, init=True):
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                probes_seen += 1
                where = f"{w['metadata']['name']}/{c['name']} {kind}"
                if "exec" in probe:
                    assert probe["exec"]["command"][0] == "pg_isready", f"{where}: unexpected exec probe"
                    continue
                get = probe["httpGet"]
                port = ports.get(get["port"], get["port"])
                assert port in ports.values(), f"{where}: port {get['port']} is not a container port"
                args = c.get("args", [])
                if is_feedloop(c, overlay):
                    if args[0] in ("serve", "worker"):
                        assert get["path"] in app_get_routes(), f"{where}: {get['path']} is not a GET route"
                        assert port == int(flag(args, "--port"))
                    else:
                        assert args[0] in ("ingest", "loop") and port == int(flag(args, "--metrics-port")), where
                        assert get["path"] == "/metrics"
                else:
                    assert c["image"].startswith("ghcr.io/huggingface/text-generation-inference:"), where
                    assert get["path"] in TGI_GET_ROUTES and port == int(flag(args, "--port")), where
    assert probes_seen
    for name in ("feedloop-gateway", "feedloop-policy-worker", "feedloop-reward-worker", "feedloop-tgi"):
        main = pod_spec(named(overlay, "Deployment", name))["containers"][0]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[kind]["httpGet"]["path"] == "/health", f"{name}: {kind}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images(overlay):
    """feedloop containers use the overlay's image of the Dockerfile's build, tagged with the package
    version; third-party images are pinned."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = feedloop_image(overlay)
    assert image.endswith(f":{version}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["feedloop"]' in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M), "the image's user is the pods' runAsUser"
    for w in workloads(overlay):
        for c in pod_containers(w, init=True):
            if is_feedloop(c, overlay):
                assert c["image"] == image
            else:
                name, _, tag = c["image"].rpartition(":")
                assert name in THIRD_PARTY_IMAGES, f"{c['image']}: an image nobody vetted"
                assert tag and tag != "latest" and re.match(r"\d", tag), f"{c['image']}: not pinned"


# ------------------------------------------------------------------------------------------- policies

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_security_and_labels(overlay):
    for obj in rendered(overlay):
        labels = obj["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                    "app.kubernetes.io/instance"):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']}: no {key}"
    for w in workloads(overlay):
        name = w["metadata"]["name"]
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"} <= set(template_labels)
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in pod_containers(w, init=True):
            where = f"{name}/{c['name']}"
            requests, limits = c["resources"]["requests"], c["resources"].get("limits", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: requests"
            assert "memory" in limits, f"{where}: a memory limit"
            assert requests.get(GPU) == limits.get(GPU), f"{where}: GPU request and limit must be equal"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged"), where


def gpus(overlay: str, name: str) -> int:
    return int(pod_spec(named(overlay, "Deployment", name))["containers"][0]["resources"]["requests"].get(GPU, 0))


def test_gpu_placement():
    """prod: the workers, the trainer and TGI get one GPU each, nothing else does. dev runs on CPU
    (TGI, which needs a GPU, is scaled to 0)."""
    for name in ("feedloop-policy-worker", "feedloop-reward-worker", "feedloop-trainer", "feedloop-tgi"):
        assert gpus("prod", name) == 1, name
    for name in ("feedloop-gateway", "feedloop-ingestor"):
        assert gpus("prod", name) == 0, name
    for w in workloads("dev"):
        for c in pod_containers(w, init=True):
            if GPU in c["resources"]["requests"]:
                assert w["spec"]["replicas"] == 0, f"dev: {w['metadata']['name']} would wait for a GPU"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkpoints_volume(overlay):
    """One checkpoints volume, at the same path everywhere (the registry stores absolute paths):
    read-write for the trainer (and the seed Job), read-only for everything that serves."""
    assert named(overlay, "PersistentVolumeClaim", CHECKPOINTS_CLAIM) is not None
    writers = set()
    for w in workloads(overlay):
        spec = pod_spec(w)
        claim_volumes = {v["name"]: v for v in spec.get("volumes", [])
                         if v.get("persistentVolumeClaim", {}).get("claimName") == CHECKPOINTS_CLAIM}
        for c in pod_containers(w, init=True):
            for m in c.get("volumeMounts", []):
                if m["name"] in claim_volumes:
                    assert m["mountPath"] == CHECKPOINTS_PATH
                    read_only = m.get("readOnly", False)
                    assert read_only == claim_volumes[m["name"]]["persistentVolumeClaim"].get("readOnly", False)
                    if not read_only:
                        writers.add(w["metadata"]["name"])
        for c in spec["containers"]:
            model = flag(c.get("args", []), "--model") or flag(c.get("args", []), "--model-id")
            if model:
                assert model.startswith(CHECKPOINTS_PATH + "/"), f"{w['metadata']['name']} loads a model off the volume"
    assert writers == {"feedloop-trainer", "feedloop-seed-model"}
    trainer = named(overlay, "Deployment", "feedloop-trainer")
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert flag(pod_spec(trainer)["containers"][0]["args"], "--runs-dir").startswith(CHECKPOINTS_PATH + "/")


def test_postgres_in_dev_only():
    sts = named("dev", "StatefulSet", "feedloop-postgres")
    assert sts is not None
    url = urlparse(named("dev", "Secret", "feedloop-secrets")["stringData"]["FEEDLOOP_DATABASE_URL"])
    assert url.scheme == "postgresql"
    pod, service = url.hostname.split(".")[:2]
    assert service == sts["spec"]["serviceName"] and pod == f"{sts['metadata']['name']}-0"
    creds = named("dev", "Secret", "feedloop-postgres")["stringData"]
    assert (url.username, url.password, url.path.lstrip("/")) == (
        creds["POSTGRES_USER"], creds["POSTGRES_PASSWORD"], creds["POSTGRES_DB"])
    assert not of_kind("prod", "StatefulSet")
    assert named("prod", "Secret", "feedloop-secrets") is None, "prod's secrets never live in git"
