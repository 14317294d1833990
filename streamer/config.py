"""The service's settings: one frozen, typed tree read once at start-up from env and CLI flags.

Every leaf has an env var (``STREAMER_<SECTION>__<FIELD>``) and a CLI flag
(``--<section>-<field>``); both names are derived from the field's path, so they cannot drift.
The core never sees this module: ``Settings.learner_config()`` hands it a plain dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import ssl
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from streamer.core.config import (
    DEVICE_NAMES,
    MAX_HORIZON,
    MAX_LEARN_AFTER,
    MAX_WINDOWS_PER_UPDATE,
    LearnerConfig,
    is_device_name,
)

# The Kafka edge's interface modules (no Kafka library): its rules are stated there, once.
from streamer.kafka.client import (
    ISOLATION_LEVELS,
    ConsumerSettings,
    ProducerSettings,
    heartbeat_fits,
)
from streamer.kafka.connection import SASL_MECHANISMS, SECURITY_PROTOCOLS, KafkaConnection

ENV_PREFIX = "STREAMER_"
ENV_NESTED_DELIMITER = "__"

# The learner's defaults live in one place, the core's dataclass; the settings read them from it.
_LEARNER_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(LearnerConfig)}

# A loop turn waits about kafka.produce_timeout_s at most for acks (the producer gives up on a
# record that long after it was sent); it must stay well inside the 120 s in which the loop has
# to come round to count as alive (serving/worker.py LIVENESS_TIMEOUT_S, /healthz).
MAX_PRODUCE_TIMEOUT_S = 60.0
# ...and at least this long: with 1 ms (accepted before) no batch was ever acknowledged in
# time, and the worker reconnected for ever against a healthy broker.
MIN_PRODUCE_TIMEOUT_S = 1.0
# Bounds far past any real use, so that a typo is a setting error, not an allocation failure
# or an overflow deep in torch (a 1e12-slot table, 1e9 layers building for ever).
MAX_SENSORS = 100_000_000

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})$")
# One label of a host name (RFC 1123, with the '_' that container and cluster names carry).
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
SaslMechanism = Literal[SASL_MECHANISMS]  # type: ignore[valid-type]  # the edge's list
SecurityProtocol = Literal[SECURITY_PROTOCOLS]  # type: ignore[valid-type]
IsolationLevel = Literal[ISOLATION_LEVELS]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """The configuration is invalid; ``str()`` is one message a user can act on."""


def env_var_name(path: tuple[str, ...]) -> str:
    """The env var that sets the setting at ``path``, e.g. ``STREAMER_KAFKA__GROUP_ID``."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(part.upper() for part in path)


def cli_flag(path: tuple[str, ...]) -> str:
    """The CLI flag that sets the setting at ``path``, e.g. ``--kafka-group-id``."""
    return "--" + "-".join(path).replace("_", "-")


def setting_name(dotted: str) -> str:
    """``kafka.group_id (STREAMER_KAFKA__GROUP_ID / --kafka-group-id)`` for messages."""
    path = tuple(dotted.split("."))
    return f"{dotted} ({env_var_name(path)} / {cli_flag(path)})"


_named = setting_name  # the short form the validators below use


def _lower(value: Any) -> Any:
    """A choice as its lower-case name: GZIP, Latest, CUDA are what the user meant."""
    return value.lower() if isinstance(value, str) else value


def table_too_large(detail: object) -> ConfigError:
    """The error for a sensor table that would not fit in memory (found by the core, which
    knows what a slot holds, when the learner is built)."""
    return ConfigError(f"invalid configuration: {_named('sensors.initial_capacity')}: {detail}; "
                       f"lower it (the table grows as sensors appear, up to "
                       f"{_named('sensors.max_sensors')})")


def _conflict(message: str) -> PydanticCustomError:
    """A cross-field error whose message already names the fields involved."""
    return PydanticCustomError("config_conflict", "{detail}", {"detail": message})


def _empty_means_unset(model: type[BaseModel], data: Any) -> Any:
    """``data`` with each empty value of an optional field of ``model`` made None: an empty env
    var or flag (`STREAMER_SENSORS__IDLE_TTL_SECONDS=`, `--torch-threads ""`) unsets it."""
    if not isinstance(data, dict):
        return data
    cleaned = dict(data)
    for name, value in data.items():
        info = model.model_fields.get(name)
        if info is not None and value == "" and type(None) in typing.get_args(info.annotation):
            cleaned[name] = None
    return cleaned


class _Section(BaseModel):
    """A frozen settings section; typos in env var names are errors, not silently ignored."""

    # inf and nan mean nothing for almost every number here (inf seconds, an infinite rate);
    # the one setting where inf has a meaning allows it itself.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_unsets(cls, data: Any) -> Any:
        return _empty_means_unset(cls, data)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A JSON true or false is no number (pydantic would read it as 1 or 0: a section
        given as JSON with `"hidden_size": true` got a model of width 1)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = {annotation, *typing.get_args(annotation)}
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("bool_not_number", "expected a number, got {value}",
                                      {"value": str(value).lower()})
        return value


def _is_host(host: str) -> bool:
    """A host name, an IPv4 address or a bracketed IPv6 one: anything else would have the
    clients retry "Unable to bootstrap" for ever instead of a setting error at start."""
    if host.startswith("["):
        return _is_ip(host[1:-1], ipaddress.IPv6Address)
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        return _is_ip(host, ipaddress.IPv4Address)
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _is_ip(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


class KafkaSettings(_Section):
    """Where readings come from and forecasts and rejected records go."""

    bootstrap_servers: str = Field(
        "localhost:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    input_topic: str = Field("sensor-readings", description="Topic the readings are read from.")
    output_topic: str = Field("sensor-forecasts", description="Topic the forecasts go to.")
    dlq_topic: str = Field(
        "sensor-readings-dlq",
        description="Dead-letter topic: rejected records, unchanged, with the reason in headers.",
    )
    anomaly_topic: str | None = Field(
        "sensor-anomalies",
        description="Topic of one event per flagged reading (key: sensor id; the reading, its "
        "forecast, interval and score); empty disables it.",
    )
    model_topic: str = Field(
        "sensor-model",
        description="Compacted one-partition topic the workers of a group share their weights "
        "through (created when missing; several groups may share it).",
    )
    group_id: str = Field("streamer", min_length=1, description="Consumer group id.")
    client_id: str = Field("streamer", min_length=1, description="Client id sent to the brokers.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts reading."
    )
    isolation_level: IsolationLevel = Field(
        "read_committed",
        description="read_committed: readings a transactional producer writes (Kafka Streams, "
        "Flink exactly-once) are forecast once their transaction commits, never when it "
        "aborts (they are sent again); read_uncommitted reads them all at once.",
    )
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="Protocol used to talk to the brokers."
    )
    sasl_mechanism: SaslMechanism | None = Field(
        None, description="SASL mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512); required "
        "with SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (prefer the env var: command lines are visible to all)."
    )
    ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) to verify the brokers; system CAs when unset."
    )
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(
        None, description="Private key (PEM) of the client certificate; an encrypted one "
        "needs kafka.ssl_key_password."
    )
    ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted client private key (kafka.ssl_keyfile, "
        "or the key inside kafka.ssl_certfile); prefer the env var."
    )
    session_timeout_ms: int = Field(
        45_000, ge=1, le=3_600_000,
        description="A consumer silent this long is removed from the group."
    )
    heartbeat_interval_ms: int = Field(
        3_000, ge=1, description="Heartbeat period; at most a third of the session timeout."
    )
    fetch_max_wait_ms: int = Field(
        500, ge=0, le=10_000,
        description="How long a broker may hold a fetch while waiting for data."
    )
    max_poll_records: int = Field(
        500, ge=1, description="Micro-batch size: the most records one poll returns."
    )
    poll_timeout_ms: int = Field(
        1_000, ge=0, le=5_000,
        description="How long one poll waits for records before returning empty (at most 5 s: "
        "a SIGTERM is acted on after the current poll; while no broker answers, after the "
        "connection attempt in progress, up to 10 s).",
    )
    produce_timeout_s: float = Field(
        30.0, ge=MIN_PRODUCE_TIMEOUT_S, le=MAX_PRODUCE_TIMEOUT_S,
        description="How long to wait for the brokers to acknowledge produced records; the "
        "producer gives up on a record after as long, but no sooner than its request timeout "
        "allows (about 10 s; 1 s at least; at most 60 s: a loop waiting longer would look "
        "hung to /healthz, which allows 120 s).",
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of the batches streamer produces; input batches are "
        "read in any of these whatever this says.",
    )
    client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="The worker's Kafka client: kafka-python (pure Python, "
        "always installed) or confluent (librdkafka, `pip install 'streamer[fast]'`).",
    )

    @field_validator("client")
    @classmethod
    def _client_installed(cls, value: str) -> str:
        if value == "confluent":
            try:
                import confluent_kafka  # noqa: F401
            except ImportError:
                raise ValueError("confluent needs confluent-kafka, which is not installed: "
                                 "pip install 'streamer[fast]'") from None
        return value

    @field_validator("group_id", "client_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # Kafka takes any string, but one of blanks (or with blanks around it) is a slip of
        # the pen, and a group's members must all name it exactly: its log line showed none.
        if value != value.strip() or not value:
            raise ValueError(f"must not be blank or start or end with a blank, got {value!r}")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",")]
        for server in servers:
            match = _HOST_PORT.match(server)
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise ValueError(
                    f"expected a comma-separated list of host:port, got entry {server!r}"
                )
            if not _is_host(match.group(1)):
                raise ValueError(f"{match.group(1)!r} (in {server!r}) is neither a host name "
                                 "nor an IP address")
        return ",".join(servers)

    @field_validator("input_topic", "output_topic", "dlq_topic", "anomaly_topic", "model_topic")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _TOPIC_NAME.match(value) or value in (".", ".."):
            raise ValueError(
                f"{value!r} is not a Kafka topic name: "
                "use 1 to 249 letters, digits, '.', '_' or '-'"
            )
        return value

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("auto_offset_reset", "isolation_level", "compression_type", "client",
                     mode="before")
    @classmethod
    def _lower_choices(cls, value: Any) -> Any:
        return _lower(value)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        self._check_topics_distinct()
        self._check_sasl()
        self._check_ssl()
        self._check_ssl_files_readable()
        if not heartbeat_fits(self.heartbeat_interval_ms, self.session_timeout_ms):
            raise _conflict(
                f"{_named('kafka.heartbeat_interval_ms')} is {self.heartbeat_interval_ms} but must "
                f"be at most a third of {_named('kafka.session_timeout_ms')}, which is "
                f"{self.session_timeout_ms}; lower the heartbeat interval or raise the session "
                "timeout"
            )
        return self

    def consumer(self) -> ConsumerSettings:
        """The Kafka edge's consumer-group settings."""
        return ConsumerSettings(
            group_id=self.group_id, session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            fetch_max_wait_ms=self.fetch_max_wait_ms, max_poll_records=self.max_poll_records,
            auto_offset_reset=self.auto_offset_reset, isolation_level=self.isolation_level,
        )

    def producer(self) -> ProducerSettings:
        """The Kafka edge's producer settings: the output codec ("none": uncompressed) and the
        delivery timeout, so that the producer retries a record as long as the worker waits."""
        codec = None if self.compression_type == "none" else self.compression_type
        # Kafka requires the delivery timeout to exceed linger + request timeout (~10 s); below
        # that the worker's own wait gives up first and discards the producer and its records.
        shortest = ProducerSettings.linger_ms + ProducerSettings.request_timeout_ms + 1
        delivery_ms = max(round(self.produce_timeout_s * 1000), shortest)
        return ProducerSettings(compression_type=codec, delivery_timeout_ms=delivery_ms)

    def connection(self) -> KafkaConnection:
        """The Kafka edge's connection settings."""
        return KafkaConnection(
            bootstrap_servers=self.bootstrap_servers, client_id=self.client_id,
            security_protocol=self.security_protocol, sasl_mechanism=self.sasl_mechanism,
            sasl_plain_username=self.sasl_username,
            sasl_plain_password=(self.sasl_password.get_secret_value() if self.sasl_password
                                 else None),
            ssl_cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
            ssl_certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
            ssl_keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            ssl_key_password=(self.ssl_key_password.get_secret_value()
                              if self.ssl_key_password else None),
        )

    def _check_topics_distinct(self) -> None:
        names = ("input_topic", "output_topic", "dlq_topic", "anomaly_topic", "model_topic")
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                topic = getattr(self, first)
                if topic is not None and topic == getattr(self, second):
                    raise _conflict(
                        f"{_named('kafka.' + first)} and {_named('kafka.' + second)} are both "
                        f"{getattr(self, first)!r}; each must name its own topic"
                    )

    def _check_sasl(self) -> None:
        sasl_fields = ("sasl_mechanism", "sasl_username", "sasl_password")
        if not self.security_protocol.startswith("SASL_"):
            given = [name for name in sasl_fields if getattr(self, name) is not None]
            if given:
                raise _conflict(
                    f"{_named('kafka.' + given[0])} is set but {_named('kafka.security_protocol')} "
                    f"is {self.security_protocol}; set the protocol to SASL_SSL or SASL_PLAINTEXT, "
                    "or unset the SASL settings"
                )
            return
        if self.sasl_mechanism is None:
            raise _conflict(
                f"{_named('kafka.sasl_mechanism')} is required when kafka.security_protocol is "
                f"{self.security_protocol}; set it to {', '.join(SASL_MECHANISMS[:-1])} or "
                f"{SASL_MECHANISMS[-1]}"
            )
        for name in ("sasl_username", "sasl_password"):
            if getattr(self, name) is None:
                raise _conflict(
                    f"{_named('kafka.' + name)} is required when kafka.sasl_mechanism is "
                    f"{self.sasl_mechanism}"
                )

    def _check_ssl(self) -> None:
        ssl_fields = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password")
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            given = [name for name in ssl_fields if getattr(self, name) is not None]
            if given:
                raise _conflict(
                    f"{_named('kafka.' + given[0])} is set but {_named('kafka.security_protocol')} "
                    f"is {self.security_protocol}; set the protocol to SSL or SASL_SSL, or unset "
                    "the SSL settings"
                )
        for name in ("ssl_keyfile", "ssl_key_password"):
            if getattr(self, name) is not None and self.ssl_certfile is None:
                raise _conflict(
                    f"{_named('kafka.' + name)} is set without {_named('kafka.ssl_certfile')}; "
                    "a private key (and its password) is only used together with its client "
                    "certificate"
                )

    def _check_ssl_files_readable(self) -> None:
        # Found here, not as a client that retries "Unable to bootstrap" for ever.
        problems = []
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is None:
                continue
            if path.is_fifo():  # open() would wait for a writer, for ever
                problems.append(f"{_named('kafka.' + name)}: {str(path)!r} is a pipe, not a file")
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append(f"{_named('kafka.' + name)}: cannot read {str(path)!r}: "
                                f"{exc.strerror or exc}")
        if problems:
            raise _conflict("; ".join(problems))
        self._check_ssl_files_usable()

    def _check_ssl_files_usable(self) -> None:
        """Loaded as the client will load them: a file that is not PEM, or a certificate and
        key that do not match, failed only in the client's TLS handshake, logged by
        kafka-python among its retries while the worker said "Unable to bootstrap"."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ssl_cafile is not None:
            try:
                context.load_verify_locations(cafile=str(self.ssl_cafile))
            except ssl.SSLError as exc:
                raise _conflict(f"{_named('kafka.ssl_cafile')}: {str(self.ssl_cafile)!r} holds "
                                f"no PEM CA certificate ({exc.reason or exc})") from None
        if self.ssl_certfile is not None:
            key = str(self.ssl_keyfile) if self.ssl_keyfile is not None else None
            password = (self.ssl_key_password.get_secret_value().encode()
                        if self.ssl_key_password is not None else b"")
            try:  # (with no password given, an encrypted key fails here: it never prompts)
                context.load_cert_chain(str(self.ssl_certfile), key, password=lambda: password)
            except ssl.SSLError as exc:
                names = _named("kafka.ssl_certfile") + (
                    f" and {_named('kafka.ssl_keyfile')}" if key else "")
                if self.ssl_key_password is None:
                    raise _conflict(
                        f"{names}: not a PEM client certificate with its unencrypted private key "
                        f"({exc.reason or exc}); an encrypted key needs "
                        f"{_named('kafka.ssl_key_password')}") from None
                raise _conflict(
                    f"{names}: not a PEM client certificate with its private key, or "
                    f"{_named('kafka.ssl_key_password')} does not decrypt that key "
                    f"({exc.reason or exc})") from None


class ModelSettings(_Section):
    """The shape of each sensor's LSTM."""

    n_features: int = Field(
        _LEARNER_DEFAULTS["n_features"], ge=1, le=1024, description="Numbers per reading (F)."
    )
    hidden_size: int = Field(
        _LEARNER_DEFAULTS["hidden_size"], ge=1, le=4096, description="LSTM hidden units per layer."
    )
    num_layers: int = Field(
        _LEARNER_DEFAULTS["num_layers"], ge=1, le=16, description="Stacked LSTM layers."
    )


class TrainingSettings(_Section):
    """Online learning: truncated BPTT, the optimizer and input normalization."""

    tbptt_steps: int = Field(
        _LEARNER_DEFAULTS["tbptt_steps"],
        ge=1,
        le=4096,
        description="Truncated-BPTT window length, in steps.",
    )
    train_every: int = Field(
        _LEARNER_DEFAULTS["train_every"],
        ge=1,
        description="Try a weight update after this many accepted readings; it runs once "
        "STREAMER_TRAINING__MIN_UPDATE_WINDOWS full TBPTT windows are queued.",
    )
    min_update_windows: int = Field(
        _LEARNER_DEFAULTS["min_update_windows"],
        ge=1,
        le=MAX_WINDOWS_PER_UPDATE,
        description="Full TBPTT windows an update waits for: one at first, one more every 16 "
        "updates up to this (or one per 16 sensors when that is more, at most 64).",
    )
    lr: float = Field(_LEARNER_DEFAULTS["lr"], gt=0, description="Optimizer learning rate.")
    max_grad_norm: float = Field(
        _LEARNER_DEFAULTS["max_grad_norm"],
        gt=0,
        description="Clip the global gradient norm to this.",
    )
    norm_alpha: float = Field(
        _LEARNER_DEFAULTS["norm_alpha"],
        ge=0,
        lt=1,
        description="Weight of the running mean/variance per reading; 0 weighs all equally.",
    )
    warmup_readings: int = Field(
        _LEARNER_DEFAULTS["warmup_readings"],
        ge=1,
        le=1_000_000_000,
        description="A new sensor's forecast is its last value until it has this many readings.",
    )
    clip_z: float = Field(
        _LEARNER_DEFAULTS["clip_z"],
        gt=0,
        description="Clip normalized inputs and targets to +-this.",
    )
    robust_stats: bool = Field(
        _LEARNER_DEFAULTS["robust_stats"],
        description="Winsorize readings at +-clip_z scales in the running statistics, so a "
        "sentinel value cannot inflate a sensor's scale.",
    )
    guard_alpha: float = Field(
        _LEARNER_DEFAULTS["guard_alpha"],
        ge=0,
        lt=1,
        description="Weight of the newest reading in each sensor's running errors of its "
        "experts (LSTM, persistence, seasonal, local linear); 0 uses the LSTM alone.",
    )
    expert_eta: float = Field(
        _LEARNER_DEFAULTS["expert_eta"],
        gt=0,
        allow_inf_nan=True,  # inf is meaningful; nan fails gt=0
        description="Learning rate of the experts' per-sensor weights (exponentially weighted "
        "average); inf follows the best expert alone.",
    )
    seasonal_alpha: float = Field(
        _LEARNER_DEFAULTS["seasonal_alpha"],
        gt=0,
        le=1,
        description="Weight of the newest cycle in a sensor's day and week profiles; 1 keeps "
        "only the last day / week.",
    )
    seed: int = Field(
        _LEARNER_DEFAULTS["seed"], ge=0, lt=2**63, description="Seed of the weight initialization."
    )


class ForecastSettings(_Section):
    """What each forecast carries besides the value."""

    coverage: float = Field(
        _LEARNER_DEFAULTS["coverage"],
        gt=0,
        lt=1,
        description="Share of next readings each forecast's [lower, upper] interval is meant to "
        "hold, calibrated online per sensor.",
    )
    horizon: int = Field(
        _LEARNER_DEFAULTS["horizon"],
        ge=1,
        le=MAX_HORIZON,
        description="How many of each sensor's next readings every forecast carries (with an "
        "interval each); 1: the next reading only.",
    )


class AnomalySettings(_Section):
    """When a reading is flagged as an anomaly."""

    threshold: float = Field(
        _LEARNER_DEFAULTS["anomaly_threshold"],
        gt=0,
        lt=1,
        description="Flag a reading whose anomaly score (1 - the tail probability of its "
        "forecast error for that sensor) is at least this.",
    )
    learn_after: int = Field(
        _LEARNER_DEFAULTS["anomaly_learn_after"],
        ge=0,
        le=MAX_LEARN_AFTER,
        description="Flagged readings leave a sensor's interval calibration alone until it has "
        "been flagged this many readings in a row (then they are its new normal); 0 learns "
        "from every reading.",
    )


class SensorSettings(_Section):
    """The table of per-sensor state."""

    max_sensors: int = Field(
        _LEARNER_DEFAULTS["max_sensors"], ge=1, le=MAX_SENSORS,
        description="Most sensors held at once."
    )
    initial_capacity: int = Field(
        _LEARNER_DEFAULTS["initial_capacity"],
        ge=1,
        le=MAX_SENSORS,
        description="Sensor slots allocated up front; the table grows up to max_sensors. "
        "Unset, it is never above max_sensors. More than the process's memory (the machine's, "
        "or its container's limit; on a CUDA device, the GPU's for the LSTM state) holds is "
        "refused at start-up (exit 2).",
    )
    idle_ttl_seconds: float | None = Field(
        _LEARNER_DEFAULTS["sensor_ttl_seconds"],
        gt=0,
        description="Evict a sensor silent this long (reading time); never when unset.",
    )
    max_sensor_id_length: int = Field(
        _LEARNER_DEFAULTS["max_sensor_id_length"],
        ge=1,
        description="Longer sensor ids are rejected.",
    )

    @model_validator(mode="after")
    def _capacity_within_max(self) -> SensorSettings:
        if self.initial_capacity > self.max_sensors:
            if "initial_capacity" not in self.model_fields_set:
                # The default (1024) is no conflict: a small max_sensors alone is valid.
                object.__setattr__(self, "initial_capacity", self.max_sensors)
                return self
            raise _conflict(
                f"{_named('sensors.initial_capacity')} is {self.initial_capacity} but must not "
                f"exceed {_named('sensors.max_sensors')}, which is {self.max_sensors}"
            )
        return self


class MetricsSettings(_Section):
    """The HTTP endpoint: Prometheus metrics, and the health probes (always served)."""

    enabled: bool = Field(
        True, description="Serve Prometheus metrics at /metrics; /healthz and /readyz are "
        "served on the same port either way.",
    )
    host: str = Field(
        "0.0.0.0", min_length=1,
        description="Address the HTTP server (metrics, /healthz, /readyz) binds.",
    )
    port: int = Field(
        9100, ge=0, le=65535,
        description="Port of /metrics, /healthz and /readyz; 0 picks a free one.",
    )


class CheckpointSettings(_Section):
    """Periodic snapshots of weights, optimizer and per-sensor state."""

    dir: Path = Field(Path("./checkpoints"), description="Directory the checkpoints are kept in.")
    interval_seconds: float | None = Field(
        10.0, gt=0, description="Checkpoint after this many seconds; never by time when unset "
        "(then interval_readings must be set)."
    )
    interval_readings: int | None = Field(
        None, ge=1, description="Checkpoint after this many readings; never by count when unset "
        "(then interval_seconds must be set)."
    )
    keep: int = Field(3, ge=1, description="How many of the latest checkpoints to keep.")
    worker_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of this worker's checkpoint files in a directory shared by the "
        "group; defaults to the host name (the pod name on Kubernetes). Two running workers "
        "with one id in one directory are refused (exit 2).",
    )
    allow_fresh_start: bool = Field(
        True,
        description="Start from fresh weights when checkpoint files exist but none is usable "
        "(corrupt, another model configuration); when off, start-up fails instead (exit 1). A "
        "first start, with no checkpoint files, starts fresh either way.",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _dir_named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():  # Path("") is the current directory
            raise ValueError("must not be empty (write . for the current directory)")
        return value

    @model_validator(mode="after")
    def _some_interval(self) -> CheckpointSettings:
        # Without either, checkpoints come only at rebalance and shutdown: offsets are never
        # committed in between (a crash reads everything again) and sharing never publishes.
        if self.interval_seconds is None and self.interval_readings is None:
            raise _conflict(
                f"{_named('checkpoint.interval_seconds')} and "
                f"{_named('checkpoint.interval_readings')} are both unset, so the worker would "
                "never checkpoint or commit offsets while it runs; set at least one of them"
            )
        return self


class SharingSettings(_Section):
    """One model per consumer group: workers average their weights through kafka.model_topic."""

    enabled: bool = Field(
        True,
        description="Share weights with the group's other workers (a worker alone behaves "
        "exactly as with sharing off).",
    )
    interval_seconds: float = Field(
        30.0, gt=0, description="Publish durable weights and average with peers at most this often."
    )
    peer_ttl_seconds: float = Field(
        300.0, gt=0, description="A peer silent this long is left out of the average."
    )
    max_message_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Largest weights record; a model whose weights do not fit is refused at "
        "start-up (raise it together with the broker's message.max.bytes).",
    )

    @model_validator(mode="after")
    def _ttl_above_interval(self) -> SharingSettings:
        if not self.peer_ttl_seconds > self.interval_seconds:
            raise _conflict(
                f"{_named('sharing.peer_ttl_seconds')} is {self.peer_ttl_seconds} but must be "
                f"above {_named('sharing.interval_seconds')}, which is {self.interval_seconds}: "
                "every peer would drop out between its publishes"
            )
        return self


class LogSettings(_Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Lowest level logged (the Kafka library's at WARNING at least, "
        "and each of its messages once a minute, saying how many like it were left out; its "
        "reports of a broker connection failed or lost are warnings: the worker handles it)."
    )
    format: Literal["plain", "json"] = Field(
        "plain", description="plain for people, json for log collectors."
    )

    @field_validator("level", "format", mode="before")
    @classmethod
    def _normalize_case(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "level" else value.lower()


class Settings(BaseSettings):
    """All of streamer's settings; each component receives only its own section."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
    )

    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings, description="Kafka connection, topics and consumer tuning."
    )
    model: ModelSettings = Field(
        default_factory=ModelSettings, description="Shape of the per-sensor LSTM."
    )
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Online training and input normalization."
    )
    sensors: SensorSettings = Field(
        default_factory=SensorSettings, description="Table of per-sensor state."
    )
    forecast: ForecastSettings = Field(
        default_factory=ForecastSettings, description="Prediction intervals on every forecast."
    )
    anomaly: AnomalySettings = Field(
        default_factory=AnomalySettings, description="Anomaly scores and flags."
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="Metrics and health endpoints."
    )
    checkpoint: CheckpointSettings = Field(
        default_factory=CheckpointSettings, description="Periodic snapshots of the learner's state."
    )
    sharing: SharingSettings = Field(
        default_factory=SharingSettings, description="Weights shared by a consumer group."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Log level and format.")
    device: str = Field(
        _LEARNER_DEFAULTS["device"],
        description=f"Torch device: {DEVICE_NAMES} (auto: cuda when available).",
    )

    torch_threads: int | None = Field(
        1,
        ge=1,
        le=1024,
        description="CPU threads torch may use (empty: torch's default, every core it sees). "
        "1 by default: the worker shares its cores with the Kafka client's network thread, "
        "and an oversubscribed torch measured 5-60x slower; raise it on dedicated cores.",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_unsets(cls, data: Any) -> Any:  # top-level fields; sections do their own
        return _empty_means_unset(cls, data)

    @model_validator(mode="after")
    def _threshold_above_coverage(self) -> Settings:
        if not self.anomaly.threshold > self.forecast.coverage:
            raise _conflict(
                f"{_named('anomaly.threshold')} is {self.anomaly.threshold} but must be above "
                f"{_named('forecast.coverage')}, which is {self.forecast.coverage}: a reading "
                "inside its interval scores up to the coverage, so it would be flagged"
            )
        return self

    @model_validator(mode="after")
    def _peers_outlive_a_checkpoint(self) -> Settings:
        every = self.checkpoint.interval_seconds
        by_time_only = every is not None and self.checkpoint.interval_readings is None
        if self.sharing.enabled and by_time_only and every >= self.sharing.peer_ttl_seconds:
            raise _conflict(
                f"{_named('sharing.peer_ttl_seconds')} is {self.sharing.peer_ttl_seconds} but "
                f"must be above {_named('checkpoint.interval_seconds')}, which is {every}: "
                "workers publish only checkpointed weights, so every peer would look silent"
            )
        return self

    @field_validator("device", mode="before")
    @classmethod
    def _device_lower(cls, value: Any) -> Any:
        return _lower(value)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not is_device_name(value):
            raise ValueError(f"expected {DEVICE_NAMES}, got {value!r}")
        return value

    def learner_config(self) -> LearnerConfig:
        """The core's plain config, built from the model, training, sensors, forecast and
        anomaly sections."""
        return LearnerConfig(
            n_features=self.model.n_features,
            hidden_size=self.model.hidden_size,
            num_layers=self.model.num_layers,
            tbptt_steps=self.training.tbptt_steps,
            train_every=self.training.train_every,
            min_update_windows=self.training.min_update_windows,
            lr=self.training.lr,
            max_grad_norm=self.training.max_grad_norm,
            initial_capacity=self.sensors.initial_capacity,
            max_sensors=self.sensors.max_sensors,
            sensor_ttl_seconds=self.sensors.idle_ttl_seconds,
            max_sensor_id_length=self.sensors.max_sensor_id_length,
            norm_alpha=self.training.norm_alpha,
            warmup_readings=self.training.warmup_readings,
            clip_z=self.training.clip_z,
            robust_stats=self.training.robust_stats,
            guard_alpha=self.training.guard_alpha,
            expert_eta=self.training.expert_eta,
            seasonal_alpha=self.training.seasonal_alpha,
            coverage=self.forecast.coverage,
            horizon=self.forecast.horizon,
            anomaly_threshold=self.anomaly.threshold,
            anomaly_learn_after=self.anomaly.learn_after,
            device=self.device,
            seed=self.training.seed,
        )

    def describe(self) -> dict[str, Any]:
        """All settings as plain JSON-able values, secrets masked: safe to log."""
        # mode="json" renders SecretStr as "**********" and paths as strings.
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class SettingField:
    """One leaf of the settings tree, with the names a user sets it by."""

    path: tuple[str, ...]
    info: FieldInfo

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env_var(self) -> str:
        return env_var_name(self.path)

    @property
    def flag(self) -> str:
        return cli_flag(self.path)


def _walk(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[SettingField]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, (*prefix, name))
        else:
            yield SettingField((*prefix, name), info)


def setting_fields() -> tuple[SettingField, ...]:
    """Every leaf setting, in declaration order (sections first, then top-level fields)."""
    return tuple(_walk(Settings, ()))


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    known = {field.dotted for field in setting_fields()}
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if dotted not in known:
            raise ConfigError(f"invalid configuration: unknown setting {dotted!r}")
        *sections, leaf = dotted.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``STREAMER_*`` env vars, with ``overrides`` (dotted paths) taking precedence.

    Raises ``ConfigError`` with a message naming each bad field's env var and CLI flag.
    """
    try:
        return Settings(**_nest(overrides or {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from err
    except SettingsError as err:  # an env var it could not even parse: a section's JSON
        raise ConfigError(_format_settings_error(err)) from err


_UNPARSED_FIELD = re.compile(r'error parsing value for field "(\w+)"')


def _format_settings_error(err: SettingsError) -> str:
    """pydantic-settings' error for an unparsable env var, naming the variable."""
    match = _UNPARSED_FIELD.search(str(err))
    reason = f": {err.__cause__}" if err.__cause__ is not None else ""
    if match is None:
        return f"invalid configuration: {err}{reason}"
    name = env_var_name((match[1],))
    return (f"invalid configuration: {name} is not valid JSON{reason}; it takes a JSON object of "
            f"the {match[1]} settings, or set them one by one ({name}__<SETTING>)")


# STREAMER_* variables that are no settings on purpose: the test failpoints, and what Kubernetes
# sets for a Service named streamer (STREAMER_SERVICE_HOST, STREAMER_SERVICE_PORT[_<NAME>],
# STREAMER_PORT_9100_TCP[_ADDR|_PORT|_PROTO], and STREAMER_PORT=tcp://...: below). Only those
# shapes: STREAMER_PORT=8080 or STREAMER_PORTS is a misspelt setting like any other.
_NOT_SETTINGS = re.compile(
    rf"^{ENV_PREFIX}(FAILPOINTS|SERVICE_HOST|SERVICE_PORT(_\w+)?"
    r"|PORT_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)$")
_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://", re.IGNORECASE)


def _not_a_setting(upper: str, value: str) -> bool:
    return bool(_NOT_SETTINGS.match(upper)) or (
        upper == f"{ENV_PREFIX}PORT" and bool(_SERVICE_LINK.match(value)))


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to a misspelt ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """The ``STREAMER_*`` variables in ``environ`` that set nothing: a misspelt top-level name
    (``STREAMER_DEVCE``) is otherwise ignored without a word. Names within a section
    (``STREAMER_KAFKA__*``) are left out: an unknown one there is a ConfigError already."""
    sections = {name.upper() for name, info in Settings.model_fields.items()
                if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}
    leaves = {field.env_var for field in setting_fields()}
    unknown = []
    for name, value in environ.items():
        upper = name.upper()  # the settings read their variables whatever the case
        if not upper.startswith(ENV_PREFIX) or upper in leaves or _not_a_setting(upper, value):
            continue
        if upper[len(ENV_PREFIX):].split(ENV_NESTED_DELIMITER, 1)[0] not in sections:
            unknown.append(name)
    return sorted(unknown)


def describe_unknown_env_var(name: str) -> str:
    """``name`` with the setting it most likely meant: ``STREAMER_DEVCE (did you mean
    STREAMER_DEVICE?)``."""
    return name + did_you_mean(name.upper(), (field.env_var for field in setting_fields()))


def _describe_location(loc: tuple[int | str, ...]) -> str | None:
    """The leaf named by the longest leading part of ``loc``, with its env var and flag."""
    names = tuple(part for part in loc if isinstance(part, str))
    known = {field.path for field in setting_fields()}
    for end in range(len(names), 0, -1):
        if names[:end] in known:
            return _named(".".join(names[:end]))
    return None


def _set_by(path: tuple[str, ...], environ: Mapping[str, str]) -> list[str]:
    """The variables of ``environ`` that reached ``path``: its own, one below it (a deeper name
    than there is), or a section's JSON above it."""
    own = env_var_name(path)
    above = {env_var_name(path[:end]) for end in range(1, len(path))}
    return sorted(name for name in environ
                  if (upper := name.upper()) == own or upper in above
                  or upper.startswith(own + ENV_NESTED_DELIMITER))


def _unknown_setting(path: tuple[str, ...], environ: Mapping[str, str]) -> str:
    """``kafka.group (set by STREAMER_KAFKA__GROUP__ID): unknown setting (did you mean
    kafka.group_id?)``: the variable the user wrote, not the one the name would have."""
    own, set_by = env_var_name(path), _set_by(path, environ)
    origin = own if {name.upper() for name in set_by} <= {own} else f"set by {', '.join(set_by)}"
    siblings = (field.dotted for field in setting_fields() if field.path[:-1] == path[:-1])
    return (f"{'.'.join(path)} ({origin}): unknown setting"
            + did_you_mean(".".join(path).lower(), siblings))


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    names = tuple(part for part in loc if isinstance(part, str))
    return any(field.path == names[:len(field.path)] and "SecretStr" in str(field.info.annotation)
               for field in setting_fields())


def _what_was_read(loc: tuple[int | str, ...], value: Any, environ: Mapping[str, str]) -> str:
    """``, got '45s'`` (never a secret's value); for a leaf given sub-settings by a deeper
    variable, the variables that did it."""
    if _is_secret(loc):
        return ""
    if isinstance(value, dict):
        below = env_var_name(tuple(part for part in loc if isinstance(part, str)))
        deeper = sorted(name for name in environ
                        if name.upper().startswith(below + ENV_NESTED_DELIMITER))
        if deeper:
            return f", got sub-settings from {', '.join(deeper)}, which sets no setting"
    text = repr(value)
    return f", got {text if len(text) <= 80 else text[:77] + '...'}"


def format_validation_error(err: ValidationError) -> str:
    """One line naming every invalid field by its env var and CLI flag, what is wrong, and the
    value read (secrets left out); a misspelt nested name by the variables it came from."""
    environ = os.environ
    problems: list[str] = []
    for error in err.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(_unknown_setting(tuple(str(part) for part in loc), environ))
            continue
        if error["type"] == "model_type" and len(loc) == 1:  # a section set whole, not an object
            problems.append(f"{loc[0]} ({env_var_name((str(loc[0]),))}): expected a JSON object "
                            "of its settings")
            continue
        where = _describe_location(loc)
        # This module's validators say what they got where it helps; pydantic's own do not.
        if (where and error["type"] != "value_error" and ", got " not in message
                and "input" in error):
            message += _what_was_read(loc, error["input"], environ)
        problems.append(f"{where}: {message}" if where else message)
    return "invalid configuration: " + "; ".join(problems)
