"""Where the brokers are and how to authenticate: shared by consumer, producer and admin."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
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

        with connecting(action, self.security_protocol):
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
            # (half the bootstrap's time, so that an attempt that hangs, a TLS handshake with
            # a listener that does not speak TLS, fails and says why within it)
            "socket.connection.setup.timeout.ms": max(int(self.bootstrap_timeout_s * 500), 1000),
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
    from kafka.net.selector import NetworkSelector

    manager_class = _bounded_handshake_manager()

    class NetClient(KafkaNetClient):
        def __init__(self, **configs: Any) -> None:
            net = NetworkSelector(**configs)
            super().__init__(net=net, manager=manager_class(net, **configs), **configs)
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


def _bounded_handshake_manager() -> Any:
    """kafka-python's connection manager with its TLS handshake bounded: by the connection's
    setup timeout (``socket_connection_setup_timeout_ms``) or the attempt's deadline, whichever
    is later.

    kafka-python 3.0.12 waits for the brokers' half of the handshake with no deadline: a client
    set to SSL against a listener that does not speak TLS (a PLAINTEXT port, which reads the
    client's hello as the length of a request hundreds of megabytes long and waits for the
    rest) waited for ever, its bootstrap timeout never reached, the worker deaf to SIGTERM.
    Here the wait ends at that bound as a failed connection attempt; the bootstrap then
    times out as for any broker that does not answer, saying so (``errors.connecting``)."""
    import ssl

    import kafka.errors as kerr
    from kafka.net.inet import create_connection
    from kafka.net.manager import KafkaConnectionManager
    from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

    class Manager(KafkaConnectionManager):
        async def _build_transport(self, node: Any, timeout_at: float | None = None) -> Any:
            # (kafka-python 3.0.12's own, but for the deadline on the handshake)
            sock = await create_connection(self._net, node.host, node.port,
                                           self.config["socket_options"],
                                           proxy_url=self.config["proxy_url"],
                                           timeout_at=timeout_at)
            if not self.ssl_enabled:
                transport = KafkaTCPTransport(self._net, sock, host=node.host)
                await transport.handshake()  # (nothing to wait for: logs "connected")
                return transport
            ssl_configs = {key: value for key, value in self.config.items()
                           if key.startswith("ssl_")}
            try:
                transport = KafkaSSLTransport(self._net, sock, host=node.host, **ssl_configs)
            except BaseException:
                sock.close()
                raise
            # (not cut at the bootstrap's own deadline, which an attempt begun late in it would
            # reach first: its handshake would end as "no answer" where it was going to say
            # why, the brokers' certificate not trusted)
            by = max(timeout_at or 0.0, time.monotonic()
                     + self.config["socket_connection_setup_timeout_ms"] / 1000)
            try:
                while True:
                    try:
                        transport._sock.do_handshake()
                        return transport
                    except ssl.SSLWantReadError:
                        await self._net.wait_read(transport._sock, by)
                    except ssl.SSLWantWriteError:
                        await self._net.wait_write(transport._sock, by)
            except kerr.KafkaTimeoutError:
                transport.close()
                raise kerr.KafkaConnectionError(
                    f"Handshake failed: no TLS answer from {node.host}:{node.port}: timed out"
                ) from None
            except Exception as exc:
                transport.close()
                raise kerr.KafkaConnectionError(f"Handshake failed: {exc}") from exc

    return Manager
