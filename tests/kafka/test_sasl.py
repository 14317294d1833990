"""Both clients through SASL (tests/broker_proxy.py authenticates as a broker does): every
mechanism the settings offer, SASL over TLS, and credentials the brokers refuse."""

from __future__ import annotations

import pytest

from streamer.kafka import ConsumerSettings, KafkaConnection, ProducerSettings, open_client
from streamer.kafka.admin import admin_client
from streamer.kafka.connection import SASL_MECHANISMS
from streamer.kafka.errors import AuthenticationFailed
from tests.broker_proxy import ProxiedBroker, round_trip

pytestmark = pytest.mark.broker

USERS = {"streamer": "pw-streamer", "other": "pw-other"}


def _sasl(broker: ProxiedBroker, mechanism: str, password: str = USERS["streamer"],
          **tls: str) -> KafkaConnection:
    return KafkaConnection(
        broker.bootstrap, security_protocol="SASL_SSL" if tls else "SASL_PLAINTEXT",
        sasl_mechanism=mechanism, sasl_plain_username="streamer", sasl_plain_password=password,
        bootstrap_timeout_s=3.0, **tls)


@pytest.mark.parametrize("mechanism", SASL_MECHANISMS)
def test_both_clients_read_and_write_through_each_sasl_mechanism(
    mechanism, client_kind, group_id, consumer_timeouts, poll_until, tmp_path
):
    with ProxiedBroker(tmp_path / "broker.log", sasl_users=USERS) as broker:
        values = round_trip(_sasl(broker, mechanism), client_kind, group_id,
                            consumer_timeouts, poll_until, b"authenticated")
        assert values == [b"authenticated"]
        # Every connection (admin, consumer, producer, each broker connection) logged in so.
        assert broker.authenticated and set(broker.authenticated) == {(mechanism, "streamer")}
        assert broker.refused == []


def test_both_clients_read_and_write_through_scram_over_tls(
    tls_files, client_kind, group_id, consumer_timeouts, poll_until, tmp_path
):
    with ProxiedBroker(tmp_path / "broker.log", tls_files=tls_files, mutual=False,
                       sasl_users=USERS) as broker:
        connection = _sasl(broker, "SCRAM-SHA-512", ssl_cafile=str(tls_files["ca"]))
        values = round_trip(connection, client_kind, group_id, consumer_timeouts, poll_until,
                            b"authenticated")
        assert values == [b"authenticated"]
        assert set(broker.authenticated) == {("SCRAM-SHA-512", "streamer")}
        assert broker.refused == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_credentials_the_brokers_refuse_are_an_authentication_error_not_an_outage(
    mechanism, client_kind, group_id, consumer_timeouts, tmp_path
):
    # Both libraries try again until their bootstrap timeout and then report only that no
    # broker answered: the brokers' reason must come through, as AuthenticationFailed (the
    # worker's exit 2) rather than BrokerUnavailable (retried for ever).
    with ProxiedBroker(tmp_path / "broker.log", sasl_users=USERS) as broker:
        connection = _sasl(broker, mechanism, password=USERS["other"])
        with pytest.raises(AuthenticationFailed, match="refused the credentials") as raised:
            client = open_client(client_kind, connection,
                                 ConsumerSettings(group_id, **consumer_timeouts),
                                 ProducerSettings())
            client.close(timeout_s=1.0)
        assert "Authentication failed" in str(raised.value)  # the brokers' own words
        with pytest.raises(AuthenticationFailed, match="refused the credentials"):
            with admin_client(connection):  # (kafka-python's, with either client)
                pass
        assert broker.authenticated == []
        assert broker.refused and all(why.startswith("Authentication failed")
                                      for why in broker.refused), broker.refused
