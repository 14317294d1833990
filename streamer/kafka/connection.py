"""Where the brokers are and how to authenticate: shared by consumer, producer and admin."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from streamer.kafka.errors import connecting

T = TypeVar("T")
log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# kafka-python can only be configured for these from plain values (OAUTHBEARER needs a token
# provider object, GSSAPI a Kerberos setup), so only these are offered; each takes a user name
# and a password.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# kafka-python 3 runs its network IO as tasks on one thread and warns ("ran for 0.142s ... It is
# blocking the event loop -- likely a tight sync loop inside a coroutine") when a task step
# takes over 0.1 s. In a worker that step is slow because the serving thread holds the
# interpreter (a training update, a checkpoint copy) or the process waits for a core, not
# because of a bug in a coroutine: at 0.1 s every worker logged it over and over. Steps this
# long still warn: they begin to threaten heartbeats and fetch deadlines.
IO_STALL_WARNING_S = 1.0
# How long closing a kafka-python client waits for its IO thread to finish the task step it is
# in (steps are short: one wait for a socket or a timer); past it the close goes on regardless.
IO_THREAD_STOP_TIMEOUT_S = 5.0
# librdkafka's own log lines go to this Python logger (as kafka-python's go to "kafka"), so that
# they take the worker's format (plain or JSON) and thinning, not librdkafka's own stderr lines.
LIBRDKAFKA_LOGGER = "librdkafka"


@dataclass(frozen=True)
class KafkaConnection:
    """Bootstrap servers, client id and security settings (the config layer builds this)."""

    bootstrap_servers: str  # "host:port[,host:port...]"
    client_id: str = "streamer"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    # kafka-python waits 30 s by default for a first broker; a worker would rather fail fast
    # with BrokerUnavailable and retry on its own schedule (and report not-ready meanwhile).
    bootstrap_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must name at least one host:port")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}, got "
                             f"{self.security_protocol!r}")
        uses_sasl = self.security_protocol.startswith("SASL_")
        if uses_sasl and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism in "
                f"{SASL_MECHANISMS}, got {self.sasl_mechanism!r}"
            )
        if uses_sasl and not (
            self.sasl_plain_username and self.sasl_plain_password
        ):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_plain_username and "
                "sasl_plain_password"
            )
        if not self.bootstrap_timeout_s > 0:
            raise ValueError(f"bootstrap_timeout_s must be > 0, got {self.bootstrap_timeout_s}")

    @classmethod
    def of(cls, connection: KafkaConnection | str) -> KafkaConnection:
        """Accept either a full connection or a bare bootstrap string (tests, local runs)."""
        return connection if isinstance(connection, KafkaConnection) else cls(connection)

    def kafka_python_config(self) -> dict[str, Any]:
        """Keyword arguments shared by KafkaConsumer, KafkaProducer and KafkaAdminClient."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": int(self.bootstrap_timeout_s * 1000),
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            # (None would let OpenSSL prompt on the terminal for an encrypted key's password)
            "ssl_password": self.ssl_key_password if self.ssl_key_password is not None
            else ("" if self.ssl_certfile else None),
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        return config

    def kafka_python(self, factory: Callable[..., T], action: str = "connecting to the brokers",
                     **settings: Any) -> T:
        """``factory(**kafka_python_config(), **settings)`` (KafkaConsumer, KafkaProducer,
        KafkaAdminClient) on kafka-python's network client with the IO stall warning at
        ``IO_STALL_WARNING_S``. kafka-python 3 starts that client, with its own IO thread,
        before it bootstraps, and leaves both behind when bootstrapping fails: a worker retrying
        through an outage would gain a thread and a socket pair per attempt. Those of a failed
        construction are closed here. Its errors are converted as ``connecting(action)`` does
        (BrokerUnavailable saying why the last attempt failed, AuthenticationFailed for refused
        credentials, BrokerNotTrusted for a brokers' certificate not trusted). Records whose
        header key is not UTF-8 are read, not failed (streamer.kafka.header_keys)."""
        from streamer.kafka.header_keys import read_header_keys_leniently

        read_header_keys_leniently()
        made: list[Any] = []
        net_client = _kafka_python_net_client()

        def tracked(**configs: Any) -> Any:
            client = net_client(**configs)
            made.append(client)
            return client

        with connecting(action):
            try:
                return factory(**{**self.kafka_python_config(), "kafka_client": tracked,
                                  **settings})
            except BaseException:
                for client in made:
                    with contextlib.suppress(Exception):
                        client.close()
                raise

    def librdkafka_config(self) -> dict[str, Any]:
        """The same settings as librdkafka properties (confluent-kafka's clients), its log
        lines to the LIBRDKAFKA_LOGGER logger."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
            "socket.connection.setup.timeout.ms": max(int(self.bootstrap_timeout_s * 1000), 1000),
            # (served on the thread that polls the client, as its callbacks are)
            "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_plain_username,
            "sasl.password": self.sasl_plain_password,
            "ssl.ca.location": self.ssl_cafile,
            "ssl.certificate.location": self.ssl_certfile,
            # librdkafka reads no key from the certificate file unless told to, as Python's
            # ssl (kafka-python) does: a key kept beside the certificate is read from there.
            "ssl.key.location": self.ssl_keyfile or self.ssl_certfile,
            "ssl.key.password": self.ssl_key_password,
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        return config


@functools.cache
def _kafka_python_net_client() -> Any:
    """kafka-python's network client with the IO stall warning at ``IO_STALL_WARNING_S``,
    its client's ``allow_auto_create_topics`` honoured, and a close that stops its IO thread
    first (imported here: the settings import this module without a Kafka library).

    kafka-python 3.0.12 closes a client's connections from the calling thread while its IO
    thread still runs their tasks: a task cancelled there in the moment the IO thread runs it
    fails with "generator already executing", logged as a traceback (a Ctrl-C of the demo
    printed one), and requests in flight fail as "Cancelled" errors mid-step. With the IO thread
    stopped (joined) first, the close runs every remaining task on the calling thread alone,
    kafka-python's own fallback when no IO thread runs. A client driven by its caller (the
    producer's sender thread) has no IO thread: nothing to stop."""
    from kafka.net.compat import KafkaNetClient

    class NetClient(KafkaNetClient):
        def __init__(self, **configs: Any) -> None:
            super().__init__(**configs)
            # kafka-python 3.0.12 builds its metadata without this setting of its client's:
            # every metadata request asked the brokers to create the topics it named.
            self._manager.cluster.config["allow_auto_create_topics"] = configs.get(
                "allow_auto_create_topics", True)

        def close(self, node_id: int | None = None) -> None:
            io_thread = self._net._io_thread
            if node_id is None and io_thread is not None:
                self._net.stop(timeout_ms=IO_THREAD_STOP_TIMEOUT_S * 1000)
                if io_thread.is_alive():  # closing beside it is the race above, or a raise
                    log.warning("kafka-python's IO thread %s did not stop within %.0f s; its "
                                "connections are left to it", io_thread.name,
                                IO_THREAD_STOP_TIMEOUT_S)
                    return
            super().close(node_id)

    return functools.partial(NetClient, slow_task_threshold_secs=IO_STALL_WARNING_S)
