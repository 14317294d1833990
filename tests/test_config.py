"""The settings tree: env contract, CLI precedence, error messages, cross-field rules."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamer.config import (
    ConfigError,
    Settings,
    describe_unknown_env_var,
    load_settings,
    setting_fields,
    unknown_env_vars,
)
from streamer.core.config import LearnerConfig
from streamer.tools.cli_options import (
    add_settings_arguments,
    settings_from_args,
    settings_overrides,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no STREAMER_* variables from the machine it runs on."""
    for name in list(os.environ):
        if name.upper().startswith("STREAMER_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamer run")
    add_settings_arguments(parser)
    return parser.parse_args(list(argv))


def error_message(overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides)
    return str(caught.value)


@pytest.mark.parametrize(
    ("env_var", "value", "section", "field", "expected"),
    [
        (
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS",
            "k1:9092,k2:9093",
            "kafka",
            "bootstrap_servers",
            "k1:9092,k2:9093",
        ),
        ("STREAMER_KAFKA__INPUT_TOPIC", "in", "kafka", "input_topic", "in"),
        ("STREAMER_KAFKA__OUTPUT_TOPIC", "out", "kafka", "output_topic", "out"),
        ("STREAMER_KAFKA__DLQ_TOPIC", "dead", "kafka", "dlq_topic", "dead"),
        ("STREAMER_KAFKA__GROUP_ID", "group-7", "kafka", "group_id", "group-7"),
        ("STREAMER_KAFKA__ISOLATION_LEVEL", "read_uncommitted", "kafka", "isolation_level",
         "read_uncommitted"),
        ("STREAMER_METRICS__PORT", "9200", "metrics", "port", 9200),
        (
            "STREAMER_CHECKPOINT__DIR",
            "/var/lib/streamer",
            "checkpoint",
            "dir",
            Path("/var/lib/streamer"),
        ),
        ("STREAMER_DEVICE", "cuda:1", None, "device", "cuda:1"),
    ],
)
def test_each_contract_env_var_sets_its_field(
    monkeypatch: pytest.MonkeyPatch,
    env_var: str,
    value: str,
    section: str | None,
    field: str,
    expected: object,
) -> None:
    monkeypatch.setenv(env_var, value)
    settings = load_settings()
    owner = getattr(settings, section) if section else settings
    assert getattr(owner, field) == expected


def test_env_var_and_flag_names_are_derived_from_the_field_path() -> None:
    by_path = {field.dotted: field for field in setting_fields()}
    assert by_path["kafka.bootstrap_servers"].env_var == "STREAMER_KAFKA__BOOTSTRAP_SERVERS"
    assert by_path["kafka.bootstrap_servers"].flag == "--kafka-bootstrap-servers"
    assert by_path["training.lr"].flag == "--training-lr"
    assert by_path["device"].env_var == "STREAMER_DEVICE"
    assert by_path["device"].flag == "--device"


def test_defaults_come_from_learner_config() -> None:
    assert load_settings().learner_config() == LearnerConfig()


def test_documented_defaults() -> None:
    settings = load_settings()
    assert settings.kafka.consumer().isolation_level == "read_committed"
    assert settings.kafka.bootstrap_servers == "localhost:9092"
    assert settings.kafka.input_topic == "sensor-readings"
    assert settings.kafka.output_topic == "sensor-forecasts"
    assert settings.kafka.dlq_topic == "sensor-readings-dlq"
    assert settings.kafka.group_id == "streamer"
    assert settings.kafka.max_poll_records == 500
    assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", 9100)
    assert settings.checkpoint.dir == Path("./checkpoints")
    assert settings.log.format == "plain"
    assert settings.device == "auto"


def test_learner_config_carries_every_value_through() -> None:
    settings = load_settings(
        {
            "model.n_features": 3,
            "model.hidden_size": 64,
            "model.num_layers": 2,
            "training.tbptt_steps": 16,
            "training.train_every": 100,
            "training.lr": 0.01,
            "training.max_grad_norm": 0.5,
            "training.norm_alpha": 0.0,
            "training.warmup_readings": 4,
            "training.clip_z": 5.0,
            "training.seed": 7,
            "sensors.max_sensors": 5000,
            "sensors.initial_capacity": 64,
            "sensors.idle_ttl_seconds": 3600.0,
            "sensors.max_sensor_id_length": 64,
            "device": "cpu",
        }
    )
    assert settings.learner_config() == LearnerConfig(
        n_features=3,
        hidden_size=64,
        num_layers=2,
        tbptt_steps=16,
        train_every=100,
        lr=0.01,
        max_grad_norm=0.5,
        initial_capacity=64,
        max_sensors=5000,
        sensor_ttl_seconds=3600.0,
        max_sensor_id_length=64,
        norm_alpha=0.0,
        warmup_readings=4,
        clip_z=5.0,
        device="cpu",
        seed=7,
    )


def test_cli_flag_beats_env_and_other_env_vars_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("STREAMER_KAFKA__INPUT_TOPIC", "topic-from-env")
    settings = settings_from_args(parse("--kafka-group-id", "from-flag"))
    assert settings.kafka.group_id == "from-flag"
    assert settings.kafka.input_topic == "topic-from-env"


def test_flags_not_passed_are_not_overrides() -> None:
    assert settings_overrides(parse("--training-lr", "0.1", "--no-metrics-enabled")) == {
        "training.lr": "0.1",
        "metrics.enabled": False,
    }


def test_boolean_flags_come_in_on_and_off_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_METRICS__ENABLED", "false")
    assert load_settings().metrics.enabled is False
    assert settings_from_args(parse("--metrics-enabled")).metrics.enabled is True
    assert settings_from_args(parse()).metrics.enabled is False
    assert (
        settings_from_args(parse("--no-checkpoint-allow-fresh-start")).checkpoint.allow_fresh_start
        is False
    )


def test_flag_values_are_typed_by_the_settings_model() -> None:
    settings = settings_from_args(
        parse("--training-lr", "0.1", "--metrics-port", "9300", "--checkpoint-dir", "/tmp/ck")
    )
    assert settings.training.lr == 0.1
    assert settings.metrics.port == 9300
    assert settings.checkpoint.dir == Path("/tmp/ck")


def test_empty_value_unsets_an_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_SENSORS__IDLE_TTL_SECONDS", "")
    assert load_settings().sensors.idle_ttl_seconds is None
    settings = settings_from_args(
        parse("--checkpoint-interval-seconds", "", "--checkpoint-interval-readings", "1000"))
    assert settings.checkpoint.interval_seconds is None


def test_empty_value_unsets_a_top_level_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_TORCH_THREADS", "")
    assert load_settings().torch_threads is None
    monkeypatch.delenv("STREAMER_TORCH_THREADS")
    assert load_settings().torch_threads == 1
    assert settings_from_args(parse("--torch-threads", "")).torch_threads is None


def test_invalid_env_value_names_env_var_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "")
    assert error_message() == (
        "invalid configuration: kafka.group_id (STREAMER_KAFKA__GROUP_ID / --kafka-group-id): "
        "String should have at least 1 character, got ''"
    )


@pytest.mark.parametrize("value", [" ", "group ", " group"])
def test_a_group_or_client_id_of_or_around_blanks_is_refused(value: str) -> None:
    # (" " was accepted, and logged invisibly: "connected ... as group  ")
    assert error_message({"kafka.group_id": value}) == (
        "invalid configuration: kafka.group_id (STREAMER_KAFKA__GROUP_ID / --kafka-group-id): "
        f"must not be blank or start or end with a blank, got {value!r}")
    assert "kafka.client_id" in error_message({"kafka.client_id": value})
    assert load_settings({"kafka.group_id": "my group"}).kafka.group_id == "my group"


def test_invalid_flag_value_names_env_var_and_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_args(parse("--metrics-port", "http"))
    assert str(caught.value) == (
        "invalid configuration: metrics.port (STREAMER_METRICS__PORT / --metrics-port): "
        "Input should be a valid integer, unable to parse string as an integer, got 'http'"
    )


def test_every_invalid_field_is_reported_in_one_message() -> None:
    assert error_message({"metrics.port": 70000, "device": "gpu"}) == (
        "invalid configuration: "
        "metrics.port (STREAMER_METRICS__PORT / --metrics-port): "
        "Input should be less than or equal to 65535, got 70000; "
        "device (STREAMER_DEVICE / --device): expected auto, cpu, cuda or cuda:N, got 'gpu'"
    )


def test_config_error_keeps_the_validation_error_as_its_cause() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"training.lr": 0})
    assert isinstance(caught.value.__cause__, ValidationError)


def test_misspelt_nested_env_var_is_reported_with_the_setting_it_resembles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVER", "k1:9092")
    assert error_message() == (
        "invalid configuration: kafka.bootstrap_server (STREAMER_KAFKA__BOOTSTRAP_SERVER): "
        "unknown setting (did you mean kafka.bootstrap_servers?)"
    )


def test_a_name_nested_too_deep_is_reported_by_the_variable_the_user_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Named by what pydantic saw (STREAMER_KAFKA__GROUP, STREAMER_KAFKA__GROUP_ID), the user
    # looked for a variable they never set.
    monkeypatch.setenv("STREAMER_KAFKA__GROUP__ID", "g")
    assert error_message() == (
        "invalid configuration: kafka.group (set by STREAMER_KAFKA__GROUP__ID): unknown setting "
        "(did you mean kafka.group_id?)"
    )
    monkeypatch.delenv("STREAMER_KAFKA__GROUP__ID")
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID__X", "1")
    assert error_message() == (
        "invalid configuration: kafka.group_id (STREAMER_KAFKA__GROUP_ID / --kafka-group-id): "
        "Input should be a valid string, got sub-settings from STREAMER_KAFKA__GROUP_ID__X, "
        "which sets no setting"
    )


def test_a_misspelt_name_in_a_section_json_names_that_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMER_MODEL", '{"hiden_size": 16}')
    assert error_message() == (
        "invalid configuration: model.hiden_size (set by STREAMER_MODEL): unknown setting "
        "(did you mean model.hidden_size?)"
    )


def test_a_secret_value_is_never_echoed_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA", '{"sasl_password": 271828, "client_id": 314159}')
    message = error_message()
    assert "kafka.sasl_password (STREAMER_KAFKA__SASL_PASSWORD" in message
    assert "271828" not in message
    assert "got 314159" in message  # what is no secret is shown


def test_a_section_set_whole_must_be_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA", '{"group_id": "from-json"}')
    assert load_settings().kafka.group_id == "from-json"
    monkeypatch.setenv("STREAMER_KAFKA", "notjson")
    assert error_message() == (
        "invalid configuration: STREAMER_KAFKA is not valid JSON: Expecting value: line 1 "
        "column 1 (char 0); it takes a JSON object of the kafka settings, or set them one by "
        "one (STREAMER_KAFKA__<SETTING>)"
    )
    monkeypatch.setenv("STREAMER_KAFKA", "[1]")
    assert error_message() == (
        "invalid configuration: kafka (STREAMER_KAFKA): expected a JSON object of its settings"
    )


def test_json_true_or_false_is_no_number(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic reads them as 1 and 0: "hidden_size": true built a model of width 1.
    monkeypatch.setenv("STREAMER_MODEL", '{"hidden_size": true}')
    assert error_message() == (
        "invalid configuration: model.hidden_size (STREAMER_MODEL__HIDDEN_SIZE / "
        "--model-hidden-size): expected a number, got true")
    monkeypatch.setenv("STREAMER_MODEL", "{}")
    monkeypatch.setenv("STREAMER_TRAINING", '{"lr": false}')
    assert error_message().endswith("training.lr (STREAMER_TRAINING__LR / --training-lr): "
                                    "expected a number, got false")
    monkeypatch.setenv("STREAMER_TRAINING", "{}")
    monkeypatch.setenv("STREAMER_SHARING", '{"enabled": true}')  # a switch takes one
    assert load_settings().sharing.enabled is True


def test_unknown_streamer_env_vars_are_found_but_not_service_links_or_failpoints() -> None:
    environ = {
        "STREAMER_DEVCE": "cpu", "STREAMER_KAFKA_GROUP_ID": "g", "streamer_torch_thread": "2",
        "STREAMER_DEVICE": "cpu", "streamer_torch_threads": "2", "STREAMER_KAFKA": "{}",
        "STREAMER_KAFKA__GROUP_ID": "g", "STREAMER_KAFKA__GROUP": "refused elsewhere",
        "STREAMER_FAILPOINTS": "after_step", "STREAMER_PORT": "tcp://10.0.0.1:9100",
        "STREAMER_PORT_9100_TCP": "tcp://10.0.0.1:9100", "STREAMER_PORT_9100_TCP_ADDR": "10.0.0.1",
        "STREAMER_PORT_9100_TCP_PORT": "9100", "STREAMER_PORT_9100_TCP_PROTO": "tcp",
        "STREAMER_SERVICE_HOST": "10.0.0.1", "STREAMER_SERVICE_PORT": "9100",
        "STREAMER_SERVICE_PORT_METRICS": "9100", "PATH": "/usr/bin",
    }
    assert unknown_env_vars(environ) == [
        "STREAMER_DEVCE", "STREAMER_KAFKA_GROUP_ID", "streamer_torch_thread"]


def test_a_port_that_is_no_kubernetes_service_link_is_an_unknown_setting() -> None:
    # Only Kubernetes' shapes are let through: STREAMER_PORT=8080 meant a metrics port.
    environ = {"STREAMER_PORT": "8080", "STREAMER_PORTS": "9100", "STREAMER_PORT_X": "1"}
    assert unknown_env_vars(environ) == ["STREAMER_PORT", "STREAMER_PORTS", "STREAMER_PORT_X"]


def test_an_unknown_env_var_is_shown_with_the_setting_it_resembles() -> None:
    assert describe_unknown_env_var("STREAMER_DEVCE") == (
        "STREAMER_DEVCE (did you mean STREAMER_DEVICE?)")
    assert describe_unknown_env_var("STREAMER_COLOUR") == "STREAMER_COLOUR"


def test_unknown_override_is_refused() -> None:
    assert error_message({"kafka.group": "g"}) == (
        "invalid configuration: unknown setting 'kafka.group'"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(device: str) -> None:
    assert load_settings({"device": device}).device == device


def test_bootstrap_servers_must_be_host_port_pairs() -> None:
    assert load_settings(
        {"kafka.bootstrap_servers": "k1:9092, [::1]:9093"}
    ).kafka.bootstrap_servers == ("k1:9092,[::1]:9093")
    assert error_message({"kafka.bootstrap_servers": "k1:9092,k2"}) == (
        "invalid configuration: kafka.bootstrap_servers "
        "(STREAMER_KAFKA__BOOTSTRAP_SERVERS / --kafka-bootstrap-servers): "
        "expected a comma-separated list of host:port, got entry 'k2'"
    )


@pytest.mark.parametrize("host", ["[...]", "[12345::1]", "[1.2.3.4]", "999.1.1.1", "1.2.3", "x..y",
                                  ".", "-kafka", "kafka-", "k" * 64 + ".example"])
def test_a_bootstrap_host_that_is_neither_a_name_nor_an_address_is_refused(host: str) -> None:
    # The clients retried "Unable to bootstrap" for ever on these instead.
    assert error_message({"kafka.bootstrap_servers": f"k1:9092,{host}:9093"}).endswith(
        f"{host!r} (in '{host}:9093') is neither a host name nor an IP address")


@pytest.mark.parametrize("host", ["localhost", "kafka_1", "10.0.0.1", "[::1]", "[2001:db8::7]",
                                  "kafka-0.kafka-headless.streaming.svc.cluster.local."])
def test_host_names_and_ip_addresses_are_bootstrap_hosts(host: str) -> None:
    assert load_settings({"kafka.bootstrap_servers": f"{host}:9092"}).kafka.bootstrap_servers \
        == f"{host}:9092"


def test_topic_names_follow_kafka_rules() -> None:
    assert error_message({"kafka.input_topic": "sensor readings"}) == (
        "invalid configuration: kafka.input_topic (STREAMER_KAFKA__INPUT_TOPIC / "
        "--kafka-input-topic): 'sensor readings' is not a Kafka topic name: "
        "use 1 to 249 letters, digits, '.', '_' or '-'"
    )


def test_case_of_enumerated_values_does_not_matter() -> None:
    settings = load_settings(
        {"log.level": "debug", "log.format": "JSON", "kafka.security_protocol": "ssl"}
    )
    assert (settings.log.level, settings.log.format) == ("DEBUG", "json")
    assert settings.kafka.security_protocol == "SSL"
    settings = load_settings({
        "kafka.compression_type": "GZIP", "kafka.auto_offset_reset": "Latest",
        "kafka.isolation_level": "READ_UNCOMMITTED", "kafka.client": "Kafka-Python",
        "device": "CPU",
    })
    assert (settings.kafka.compression_type, settings.kafka.auto_offset_reset,
            settings.kafka.isolation_level, settings.kafka.client, settings.device) == (
        "gzip", "latest", "read_uncommitted", "kafka-python", "cpu")


def test_sasl_protocol_requires_a_mechanism() -> None:
    assert error_message({"kafka.security_protocol": "SASL_SSL"}) == (
        "invalid configuration: kafka.sasl_mechanism (STREAMER_KAFKA__SASL_MECHANISM / "
        "--kafka-sasl-mechanism) is required when kafka.security_protocol is SASL_SSL; "
        "set it to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )


def test_sasl_mechanism_requires_username_and_password() -> None:
    message = error_message(
        {
            "kafka.security_protocol": "SASL_PLAINTEXT",
            "kafka.sasl_mechanism": "SCRAM-SHA-512",
            "kafka.sasl_username": "svc",
        }
    )
    assert message == (
        "invalid configuration: kafka.sasl_password (STREAMER_KAFKA__SASL_PASSWORD / "
        "--kafka-sasl-password) is required when kafka.sasl_mechanism is SCRAM-SHA-512"
    )


def test_sasl_settings_without_sasl_protocol_are_refused() -> None:
    assert error_message({"kafka.sasl_username": "svc"}) == (
        "invalid configuration: kafka.sasl_username (STREAMER_KAFKA__SASL_USERNAME / "
        "--kafka-sasl-username) is set but kafka.security_protocol "
        "(STREAMER_KAFKA__SECURITY_PROTOCOL / --kafka-security-protocol) is PLAINTEXT; "
        "set the protocol to SASL_SSL or SASL_PLAINTEXT, or unset the SASL settings"
    )


def test_ssl_files_without_ssl_protocol_are_refused() -> None:
    assert error_message({"kafka.ssl_cafile": "/etc/ca.pem"}) == (
        "invalid configuration: kafka.ssl_cafile (STREAMER_KAFKA__SSL_CAFILE / "
        "--kafka-ssl-cafile) is set but kafka.security_protocol "
        "(STREAMER_KAFKA__SECURITY_PROTOCOL / --kafka-security-protocol) is PLAINTEXT; "
        "set the protocol to SSL or SASL_SSL, or unset the SSL settings"
    )


def test_ssl_key_needs_its_certificate() -> None:
    overrides = {"kafka.security_protocol": "SSL", "kafka.ssl_keyfile": "/etc/client.key"}
    assert error_message(overrides) == (
        "invalid configuration: kafka.ssl_keyfile (STREAMER_KAFKA__SSL_KEYFILE / "
        "--kafka-ssl-keyfile) is set without kafka.ssl_certfile (STREAMER_KAFKA__SSL_CERTFILE / "
        "--kafka-ssl-certfile); a private key (and its password) is only used together with its "
        "client certificate"
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A self-signed certificate and its key (PEM), as openssl makes them, and another key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "other_key")}
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=streamer-test", "-keyout", str(files["key"]),
                    "-out", str(files["cert"])], check=True, capture_output=True)
    subprocess.run(["openssl", "genrsa", "-out", str(files["other_key"]), "2048"], check=True,
                   capture_output=True)
    return files


def test_ssl_files_are_loaded_at_start_as_the_client_loads_them(tls_files, tmp_path) -> None:
    # (a file that was no PEM, or a key of another certificate, failed only in the TLS
    # handshake: the worker retried "Unable to bootstrap" for ever)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("sensor_id,ts,value\n")
    ssl_on = {"kafka.security_protocol": "SSL"}
    assert error_message({**ssl_on, "kafka.ssl_cafile": str(garbage)}).startswith(
        "invalid configuration: kafka.ssl_cafile (STREAMER_KAFKA__SSL_CAFILE / "
        f"--kafka-ssl-cafile): '{garbage}' holds no PEM CA certificate (")
    assert error_message({**ssl_on, "kafka.ssl_certfile": str(tls_files["cert"]),
                          "kafka.ssl_keyfile": str(tls_files["other_key"])}).startswith(
        "invalid configuration: kafka.ssl_certfile (STREAMER_KAFKA__SSL_CERTFILE / "
        "--kafka-ssl-certfile) and kafka.ssl_keyfile (STREAMER_KAFKA__SSL_KEYFILE / "
        "--kafka-ssl-keyfile): not a PEM client certificate with its unencrypted private key (")
    settings = load_settings({**ssl_on, "kafka.ssl_cafile": str(tls_files["cert"]),
                              "kafka.ssl_certfile": str(tls_files["cert"]),
                              "kafka.ssl_keyfile": str(tls_files["key"])})
    assert settings.kafka.connection().ssl_keyfile == str(tls_files["key"])


def test_an_encrypted_client_key_is_loaded_with_its_password_and_refused_without(
    tls_files, tmp_path
) -> None:
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(tls_files["key"]), "-aes256", "-passout",
                    "pass:s3cret", "-out", str(encrypted)], check=True, capture_output=True)
    mtls = {"kafka.security_protocol": "SSL", "kafka.ssl_certfile": str(tls_files["cert"]),
            "kafka.ssl_keyfile": str(encrypted)}
    names = ("invalid configuration: kafka.ssl_certfile (STREAMER_KAFKA__SSL_CERTFILE / "
             "--kafka-ssl-certfile) and kafka.ssl_keyfile (STREAMER_KAFKA__SSL_KEYFILE / "
             "--kafka-ssl-keyfile): ")
    password = ("kafka.ssl_key_password (STREAMER_KAFKA__SSL_KEY_PASSWORD / "
                "--kafka-ssl-key-password)")
    without = error_message(mtls)
    assert without.startswith(names + "not a PEM client certificate with its unencrypted ")
    assert without.endswith(f"; an encrypted key needs {password}")
    assert error_message({**mtls, "kafka.ssl_key_password": "wrong"}).startswith(
        names + f"not a PEM client certificate with its private key, or {password} does not "
        "decrypt that key (")
    connection = load_settings({**mtls, "kafka.ssl_key_password": "s3cret"}).kafka.connection()
    assert connection.ssl_key_password == "s3cret" and "s3cret" not in repr(connection)
    assert connection.kafka_python_config()["ssl_password"] == "s3cret"
    assert connection.librdkafka_config()["ssl.key.password"] == "s3cret"
    assert error_message({"kafka.security_protocol": "SSL",
                          "kafka.ssl_key_password": "s3cret"}) == (
        f"invalid configuration: {password} is set without kafka.ssl_certfile "
        "(STREAMER_KAFKA__SSL_CERTFILE / --kafka-ssl-certfile); a private key (and its "
        "password) is only used together with its client certificate")
    assert error_message({"kafka.ssl_key_password": "s3cret"}).startswith(
        f"invalid configuration: {password} is set but kafka.security_protocol")


def test_ssl_files_must_be_readable_at_load(tls_files, tmp_path: Path) -> None:
    ca = tls_files["cert"]
    overrides = {"kafka.security_protocol": "SSL", "kafka.ssl_cafile": str(ca),
                 "kafka.ssl_certfile": str(tmp_path / "missing.pem"),
                 "kafka.ssl_keyfile": str(tmp_path)}
    assert error_message(overrides) == (
        "invalid configuration: kafka.ssl_certfile (STREAMER_KAFKA__SSL_CERTFILE / "
        f"--kafka-ssl-certfile): cannot read '{tmp_path}/missing.pem': No such file or directory; "
        "kafka.ssl_keyfile (STREAMER_KAFKA__SSL_KEYFILE / --kafka-ssl-keyfile): cannot read "
        f"'{tmp_path}': Is a directory"
    )
    settings = load_settings({"kafka.security_protocol": "SSL", "kafka.ssl_cafile": str(ca)})
    assert settings.kafka.connection().ssl_cafile == str(ca)


def test_heartbeat_must_be_at_most_a_third_of_the_session_timeout() -> None:
    overrides = {"kafka.session_timeout_ms": 6000, "kafka.heartbeat_interval_ms": 2001}
    assert error_message(overrides) == (
        "invalid configuration: kafka.heartbeat_interval_ms "
        "(STREAMER_KAFKA__HEARTBEAT_INTERVAL_MS / --kafka-heartbeat-interval-ms) is 2001 but "
        "must be at most a third of kafka.session_timeout_ms (STREAMER_KAFKA__SESSION_TIMEOUT_MS / "
        "--kafka-session-timeout-ms), which is 6000; lower the heartbeat interval or raise the "
        "session timeout"
    )
    # The test broker's settings (see docs/test-broker.md) are valid.
    overrides = {"kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 500}
    assert load_settings(overrides).kafka.heartbeat_interval_ms == 500


def test_topics_must_differ() -> None:
    assert error_message({"kafka.dlq_topic": "sensor-forecasts"}) == (
        "invalid configuration: kafka.output_topic (STREAMER_KAFKA__OUTPUT_TOPIC / "
        "--kafka-output-topic) and kafka.dlq_topic (STREAMER_KAFKA__DLQ_TOPIC / "
        "--kafka-dlq-topic) are both 'sensor-forecasts'; each must name its own topic"
    )


def test_initial_capacity_must_not_exceed_max_sensors() -> None:
    assert error_message({"sensors.max_sensors": 100, "sensors.initial_capacity": 1024}) == (
        "invalid configuration: sensors.initial_capacity (STREAMER_SENSORS__INITIAL_CAPACITY / "
        "--sensors-initial-capacity) is 1024 but must not exceed sensors.max_sensors "
        "(STREAMER_SENSORS__MAX_SENSORS / --sensors-max-sensors), which is 100"
    )


def test_a_max_sensors_below_the_default_initial_capacity_alone_is_valid(monkeypatch) -> None:
    # It refused to start: the unset initial capacity (1024) exceeded it.
    assert load_settings({"sensors.max_sensors": 40}).sensors.initial_capacity == 40
    monkeypatch.setenv("STREAMER_SENSORS__MAX_SENSORS", "40")
    settings = load_settings()
    assert (settings.sensors.max_sensors, settings.sensors.initial_capacity) == (40, 40)
    assert settings.learner_config().initial_capacity == 40


def test_checkpoints_need_an_interval_by_time_or_by_count() -> None:
    assert error_message({"checkpoint.interval_seconds": ""}) == (
        "invalid configuration: checkpoint.interval_seconds "
        "(STREAMER_CHECKPOINT__INTERVAL_SECONDS / --checkpoint-interval-seconds) and "
        "checkpoint.interval_readings (STREAMER_CHECKPOINT__INTERVAL_READINGS / "
        "--checkpoint-interval-readings) are both unset, so the worker would never checkpoint "
        "or commit offsets while it runs; set at least one of them"
    )
    by_count = load_settings({"checkpoint.interval_seconds": "",
                              "checkpoint.interval_readings": "5000"}).checkpoint
    assert (by_count.interval_seconds, by_count.interval_readings) == (None, 5000)


def test_settings_and_sections_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.device = "cpu"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka.group_id = "other"  # type: ignore[misc]


def test_describe_masks_secrets_and_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__SASL_PASSWORD", "hunter2-secret")
    settings = load_settings(
        {
            "kafka.security_protocol": "SASL_SSL",
            "kafka.sasl_mechanism": "PLAIN",
            "kafka.sasl_username": "svc",
        }
    )
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "hunter2-secret"
    described = settings.describe()
    assert described["kafka"]["sasl_password"] == "**********"
    assert described["kafka"]["sasl_username"] == "svc"
    assert described["checkpoint"]["dir"] == "checkpoints"
    assert "hunter2" not in json.dumps(described)


def test_help_documents_every_setting_with_env_var_and_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside names
    parser = argparse.ArgumentParser(prog="streamer run")
    add_settings_arguments(parser)
    text = parser.format_help()
    for field in setting_fields():
        assert field.flag in text
        assert f"env {field.env_var};" in text
    assert (
        "--training-lr FLOAT Optimizer learning rate. [env STREAMER_TRAINING__LR; default 0.005]"
        in " ".join(text.split())
    )
    assert "--metrics-enabled, --no-metrics-enabled" in text


def test_every_field_has_a_description() -> None:
    for field in setting_fields():
        assert field.info.description, field.dotted
    for name, info in Settings.model_fields.items():
        assert info.description, name


def test_min_update_windows_beyond_what_one_update_trains_is_refused() -> None:
    assert error_message({"training.min_update_windows": 8193}) == (
        "invalid configuration: training.min_update_windows "
        "(STREAMER_TRAINING__MIN_UPDATE_WINDOWS / --training-min-update-windows): "
        "Input should be less than or equal to 8192, got 8193"
    )
    with pytest.raises(ValueError, match="min_update_windows must be <= 8192"):
        LearnerConfig(min_update_windows=8193)


def test_anomaly_threshold_must_be_above_the_coverage() -> None:
    assert error_message({"forecast.coverage": "0.95", "anomaly.threshold": "0.9"}) == (
        "invalid configuration: anomaly.threshold (STREAMER_ANOMALY__THRESHOLD / "
        "--anomaly-threshold) is 0.9 but must be above forecast.coverage "
        "(STREAMER_FORECAST__COVERAGE / --forecast-coverage), which is 0.95: a reading inside "
        "its interval scores up to the coverage, so it would be flagged"
    )
    with pytest.raises(ValueError, match="must be above coverage"):
        LearnerConfig(coverage=0.95, anomaly_threshold=0.9)


def test_an_empty_anomaly_topic_turns_the_anomaly_events_off() -> None:
    assert load_settings({"kafka.anomaly_topic": ""}).kafka.anomaly_topic is None
    assert load_settings({}).kafka.anomaly_topic == "sensor-anomalies"
    assert "each must name its own topic" in error_message(
        {"kafka.anomaly_topic": "sensor-forecasts"})


def test_kafka_settings_give_the_clients_consumer_and_producer_settings():
    settings = load_settings({"kafka.group_id": "g7", "kafka.session_timeout_ms": "30000",
                              "kafka.heartbeat_interval_ms": "2000",
                              "kafka.compression_type": "zstd",
                              "kafka.auto_offset_reset": "latest"})
    consumer, producer = settings.kafka.consumer(), settings.kafka.producer()
    assert (consumer.group_id, consumer.session_timeout_ms, consumer.heartbeat_interval_ms,
            consumer.auto_offset_reset) == ("g7", 30_000, 2_000, "latest")
    assert producer.compression_type == "zstd"
    assert load_settings().kafka.producer().compression_type is None  # "none": uncompressed


FLOAT_SETTINGS = [field.dotted for field in setting_fields()
                  if field.info.annotation in (float, float | None)]


@pytest.mark.parametrize("dotted", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_numbers_must_be_finite_where_infinity_means_nothing(dotted: str, value: str) -> None:
    if dotted == "training.expert_eta" and value == "inf":  # documented: the best expert alone
        assert load_settings({dotted: value}).training.expert_eta == float("inf")
        return
    with pytest.raises(ConfigError, match=f"^invalid configuration: {dotted} "):
        load_settings({dotted: value})


def test_infinite_seconds_and_rates_are_refused_with_a_message_naming_the_setting() -> None:
    assert FLOAT_SETTINGS  # the parametrized test above ran over something
    assert error_message({"training.lr": "inf"}) == (
        "invalid configuration: training.lr (STREAMER_TRAINING__LR / --training-lr): "
        "Input should be a finite number, got 'inf'"
    )
    assert "Input should be a finite number" in error_message(
        {"sensors.idle_ttl_seconds": "inf"})


def test_the_producer_retries_a_record_as_long_as_the_worker_waits_for_its_ack() -> None:
    def delivery_timeout_ms(produce_timeout_s: str) -> int:
        settings = load_settings({"kafka.produce_timeout_s": produce_timeout_s})
        return settings.kafka.producer().delivery_timeout_ms

    assert delivery_timeout_ms("45") == 45_000
    assert delivery_timeout_ms("30") == 30_000
    # Kafka wants more than linger + request timeout: the worker's own wait gives up first.
    assert delivery_timeout_ms("1.5") == 10_006
    assert error_message({"kafka.produce_timeout_s": "61"}) == (
        "invalid configuration: kafka.produce_timeout_s (STREAMER_KAFKA__PRODUCE_TIMEOUT_S / "
        "--kafka-produce-timeout-s): Input should be less than or equal to 60, got '61'"
    )
    # No batch was ever acknowledged within 1 ms: the worker reconnected for ever.
    assert error_message({"kafka.produce_timeout_s": "0.001"}) == (
        "invalid configuration: kafka.produce_timeout_s (STREAMER_KAFKA__PRODUCE_TIMEOUT_S / "
        "--kafka-produce-timeout-s): Input should be greater than or equal to 1, got '0.001'"
    )


def test_the_settings_and_the_kafka_edge_state_the_same_consumer_defaults_and_rule() -> None:
    from streamer.kafka.client import ConsumerSettings

    edge, settings = ConsumerSettings("streamer"), load_settings({}).kafka.consumer()
    assert (edge.session_timeout_ms, edge.heartbeat_interval_ms) == (
        settings.session_timeout_ms, settings.heartbeat_interval_ms)
    # Exactly a third (Kafka's guidance: "no higher than 1/3") is taken by both layers, a
    # millisecond more refused by both.
    ConsumerSettings("g", session_timeout_ms=9_000, heartbeat_interval_ms=3_000)
    third = load_settings({"kafka.session_timeout_ms": "9000",
                           "kafka.heartbeat_interval_ms": "3000"})
    assert third.kafka.heartbeat_interval_ms == 3000
    with pytest.raises(ValueError, match="at most a third"):
        ConsumerSettings("g", session_timeout_ms=9_000, heartbeat_interval_ms=3_001)
    assert "at most a third" in error_message({"kafka.session_timeout_ms": "9000",
                                               "kafka.heartbeat_interval_ms": "3001"})


def test_sharing_needs_peers_to_outlive_the_intervals_they_publish_at() -> None:
    assert "must be above sharing.interval_seconds" in error_message(
        {"sharing.interval_seconds": "60", "sharing.peer_ttl_seconds": "30"})
    assert error_message({"checkpoint.interval_seconds": "600"}) == (
        "invalid configuration: sharing.peer_ttl_seconds (STREAMER_SHARING__PEER_TTL_SECONDS / "
        "--sharing-peer-ttl-seconds) is 300.0 but must be above checkpoint.interval_seconds "
        "(STREAMER_CHECKPOINT__INTERVAL_SECONDS / --checkpoint-interval-seconds), which is "
        "600.0: workers publish only checkpointed weights, so every peer would look silent"
    )
    assert load_settings({"checkpoint.interval_seconds": "600",
                          "sharing.enabled": "false"}).sharing.enabled is False
    # Checkpoints by count as well: how often they come depends on the stream, not the clock.
    assert load_settings({"checkpoint.interval_seconds": "3600",
                          "checkpoint.interval_readings": "60"}).sharing.enabled
    assert "kafka.model_topic" in error_message({"kafka.model_topic": "sensor-forecasts"})


@pytest.mark.parametrize(("dotted", "value"), [
    ("model.hidden_size", "100000"),  # tried to allocate 160 GB
    ("model.num_layers", "1000000000"),  # built layers for ever
    ("model.n_features", "1000000000"),
    ("training.tbptt_steps", "1000000000"),
    ("training.warmup_readings", str(2**63)),  # overflowed mid-replay
    ("training.seed", str(2**64)),  # overflowed in torch.manual_seed
    ("torch_threads", str(2**31)),
    ("sensors.max_sensors", "1000000000000"),
    ("sensors.initial_capacity", "1000000000000"),  # MemoryError allocating the table
    ("kafka.session_timeout_ms", "3600001"),  # librdkafka: invalid argument, a traceback
    ("kafka.fetch_max_wait_ms", "30000"),  # kafka-python: above its request timeout, for ever
])
def test_a_size_or_time_far_past_any_real_use_is_a_setting_error(dotted: str,
                                                                 value: str) -> None:
    assert error_message({dotted: value}).startswith(f"invalid configuration: {dotted} ")


def test_an_empty_checkpoint_dir_is_refused_not_read_as_the_current_directory() -> None:
    assert "must not be empty" in error_message({"checkpoint.dir": ""})
    assert load_settings({"checkpoint.dir": "."}).checkpoint.dir == Path(".")


def test_a_tls_file_that_is_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path) -> None:
    import os

    pipe = tmp_path / "ca.pem"
    os.mkfifo(pipe)
    message = error_message({"kafka.security_protocol": "SSL", "kafka.ssl_cafile": str(pipe)})
    assert f"{str(pipe)!r} is a pipe, not a file" in message
