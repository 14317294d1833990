"""Both clients over real TLS (tests/broker_proxy.py): mutual TLS with an encrypted client key."""

from __future__ import annotations

import pytest

from streamer.kafka import (
    ConsumerSettings,
    KafkaConnection,
    ProducerSettings,
    open_client,
)
from streamer.kafka.errors import BrokerNotTrusted, BrokerUnavailable
from tests.broker_proxy import ProxiedBroker, round_trip
from tests.conftest import TLS_KEY_PASSWORD

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("key_where", ["own file", "certificate file"])
def test_both_clients_read_and_write_over_mutual_tls_with_an_encrypted_client_key(
    tls_files, key_where, client_kind, group_id, consumer_timeouts, poll_until, tmp_path
):
    if key_where == "own file":
        certificate = {"ssl_certfile": str(tls_files["client"]),
                       "ssl_keyfile": str(tls_files["client_key"])}
    else:  # (librdkafka read no key from there unless told to)
        certificate = {"ssl_certfile": str(tls_files["client_with_key"])}
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files) as broker:
        connection = KafkaConnection(
            broker.bootstrap, security_protocol="SSL", ssl_cafile=str(tls_files["ca"]),
            ssl_key_password=TLS_KEY_PASSWORD, bootstrap_timeout_s=5.0, **certificate)
        values = round_trip(connection, client_kind, group_id, consumer_timeouts, poll_until,
                            b"over tls")
        assert values == [b"over tls"]
        assert broker.client_names and set(broker.client_names) == {"streamer-client"}
        assert broker.refused == []


def test_a_client_without_the_ca_of_the_brokers_certificate_is_refused(
    tls_files, client_kind, group_id, consumer_timeouts, tmp_path
):
    # ...so the test above did verify the broker: the system CAs do not know the test CA.
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files) as broker:
        connection = KafkaConnection(
            broker.bootstrap, security_protocol="SSL", ssl_certfile=str(tls_files["client"]),
            ssl_keyfile=str(tls_files["client_key"]), ssl_key_password=TLS_KEY_PASSWORD,
            bootstrap_timeout_s=2.0)
        with pytest.raises(BrokerNotTrusted) as raised:
            client = open_client(client_kind, connection,
                                 ConsumerSettings(group_id, **consumer_timeouts),
                                 ProducerSettings())
            client.close(timeout_s=1.0)  # (if it came this far: librdkafka connects lazily)
            raise AssertionError("connected without trusting the broker's certificate")
        # ...and says why, where both libraries themselves say only that no broker answered:
        # a setting to fix (the worker exits 2), not an outage to retry for ever.
        assert "certificate verify failed" in str(raised.value).lower(), raised.value
        assert "TLS certificate was not trusted" in str(raised.value), raised.value
        assert broker.client_names == []
        assert broker.refused and all("UNKNOWN_CA" in why for why in broker.refused), (
            broker.refused)


@pytest.mark.timeout(60)
def test_a_tls_client_against_a_plaintext_listener_gives_up_in_its_bootstrap_time_saying_what_to_check(  # noqa: E501
    broker, client_kind, group_id, consumer_timeouts
):
    # The local broker's listener is plaintext: it reads the client's hello as the length of a
    # request of some 369 MB and waits for the rest. kafka-python waited for the brokers' half
    # of the handshake without a deadline (for ever, its bootstrap timeout never reached, the
    # worker deaf to SIGTERM); librdkafka gave up saying only "Broker transport failure".
    connection = KafkaConnection(broker.bootstrap, security_protocol="SSL",
                                 bootstrap_timeout_s=4.0)
    with pytest.raises(BrokerUnavailable) as raised:
        client = open_client(client_kind, connection,
                             ConsumerSettings(group_id, **consumer_timeouts), ProducerSettings())
        client.close(timeout_s=1.0)
        raise AssertionError("connected over TLS to a plaintext listener")
    said = str(raised.value)
    assert "does that listener speak TLS? STREAMER_KAFKA__SECURITY_PROTOCOL is SSL" in said, said
    assert "timed out" in said, said


def test_a_plaintext_client_against_a_tls_listener_is_told_to_set_the_security_protocol(
    tls_files, client_kind, group_id, consumer_timeouts, tmp_path
):
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files, mutual=False) as broker:
        connection = KafkaConnection(broker.bootstrap, bootstrap_timeout_s=3.0)
        with pytest.raises(BrokerUnavailable) as raised:
            client = open_client(client_kind, connection,
                                 ConsumerSettings(group_id, **consumer_timeouts),
                                 ProducerSettings())
            client.close(timeout_s=1.0)
            raise AssertionError("connected in plaintext to a TLS listener")
        said = str(raised.value)
        assert ("if that listener speaks TLS, STREAMER_KAFKA__SECURITY_PROTOCOL must be SSL or "
                "SASL_SSL, not PLAINTEXT") in said, said
        assert broker.refused, "the listener saw no handshake"
