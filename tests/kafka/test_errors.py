"""errors.connecting: why kafka-python's bootstrap failed, read from what it logged (its own
exception says only "Unable to bootstrap"). No broker: the library's records are made here as
its IO thread makes them (tests/kafka/test_sasl.py and test_tls.py have the real ones)."""

from __future__ import annotations

import logging
import ssl
import threading

import kafka.errors as kerr
import pytest

from streamer.kafka.errors import (
    AuthenticationFailed,
    BrokerNotTrusted,
    BrokerUnavailable,
    connecting,
    convert,
    describe,
    listener_hint,
)

MANAGER = logging.getLogger("kafka.net.manager")
REFUSED = kerr.SaslAuthenticationFailedError("Authentication failed: Invalid username or password")


def _handshake_failed(error: ssl.SSLError) -> kerr.KafkaConnectionError:
    """As kafka-python raises it: while handling the ssl module's error (net/manager.py)."""
    try:
        try:
            raise error
        except ssl.SSLError as exc:
            raise kerr.KafkaConnectionError(f"Handshake failed: {exc}")  # noqa: B904 - as it is
    except kerr.KafkaConnectionError as exc:
        return exc


UNTRUSTED = _handshake_failed(ssl.SSLCertVerificationError(
    1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"))
# TLS spoken to a plaintext listener: a handshake that failed, but no verdict on a certificate.
WRONG_VERSION = _handshake_failed(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version"))


@pytest.fixture(autouse=True)
def _library_logging_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kafka")  # as configure_logging sets it at INFO


def _logged_on_a_new_thread(*failures: Exception) -> None:
    """As kafka-python's IO thread, started by the client being built, logs them."""
    def log() -> None:
        for failure in failures:
            MANAGER.warning("Bootstrap connection to %s failed: %s", "bootstrap-0", failure)
        MANAGER.error("Bootstrap failed: %s", kerr.KafkaTimeoutError("Unable to bootstrap"))

    thread = threading.Thread(target=log)
    thread.start()
    thread.join()


def test_a_bootstrap_timeout_while_the_brokers_refused_the_credentials_is_their_refusal():
    with pytest.raises(AuthenticationFailed, match="refused the credentials: .*Invalid username"):
        with connecting("connecting the consumer"):
            _logged_on_a_new_thread(UNTRUSTED, REFUSED)
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")


def test_a_refusal_logged_on_the_thread_that_builds_the_client_is_its_refusal():
    with pytest.raises(AuthenticationFailed, match="Invalid username"):
        with connecting("connecting the producer"):  # (a producer bootstraps on it)
            MANAGER.warning("Bootstrap connection to %s failed: %s", "bootstrap-0", REFUSED)
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")


def test_a_refusal_logged_by_another_clients_thread_is_not_taken_for_this_clients():
    def other_client() -> None:  # a thread that was there before this client was built
        started.set()
        go.wait()
        MANAGER.warning("Bootstrap connection to %s failed: %s", "bootstrap-0", REFUSED)

    started, go = threading.Event(), threading.Event()
    other = threading.Thread(target=other_client)
    other.start()
    started.wait()
    with pytest.raises(BrokerUnavailable) as raised:
        with connecting("connecting the consumer"):
            go.set()
            other.join()
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    assert not isinstance(raised.value, AuthenticationFailed)


def test_a_bootstrap_timeout_says_why_its_last_attempt_failed():
    with pytest.raises(BrokerUnavailable) as raised:
        with connecting("connecting the admin client"):
            _logged_on_a_new_thread(kerr.KafkaConnectionError("111 ECONNREFUSED"), WRONG_VERSION)
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    assert str(raised.value) == (
        "connecting the admin client failed: KafkaTimeoutError: Unable to bootstrap from "
        "b:9092 (the last attempt: KafkaConnectionError: Handshake failed: "
        "[SSL: WRONG_VERSION_NUMBER] wrong version)")
    assert not isinstance(raised.value, AuthenticationFailed)


def test_a_bootstrap_whose_last_attempt_did_not_trust_the_brokers_certificate_is_refused():
    # A setting to fix (the CA file, or the host the certificate names), as refused
    # credentials are: not an outage to retry for ever.
    with pytest.raises(BrokerNotTrusted) as raised:
        with connecting("connecting the admin client"):
            _logged_on_a_new_thread(kerr.KafkaConnectionError("111 ECONNREFUSED"), UNTRUSTED)
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    assert str(raised.value) == (
        "connecting the admin client failed: the brokers' TLS certificate was not trusted: "
        "KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
        "verify failed: self-signed certificate")
    assert isinstance(raised.value, AuthenticationFailed)  # (what the worker exits 2 on)


def test_a_certificate_not_trusted_before_a_later_failure_is_not_the_reason():
    # (a broker being replaced: the old one's certificate, then the new one down for now)
    with pytest.raises(BrokerUnavailable) as raised:
        with connecting("connecting the consumer"):
            _logged_on_a_new_thread(UNTRUSTED, kerr.KafkaConnectionError("111 ECONNREFUSED"))
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    assert not isinstance(raised.value, AuthenticationFailed)
    assert raised.value.args[0].endswith("(the last attempt: KafkaConnectionError: "
                                         "111 ECONNREFUSED)")


def test_a_certificate_not_trusted_before_an_attempt_that_timed_out_is_still_the_reason():
    # The last attempt of a 2 s bootstrap, begun late in it, timed out connecting to a busy
    # TLS listener: "no broker answered" where the certificate was why (a CI flake of
    # test_tls). An attempt that got no answer says nothing against the certificate.
    for timed_out in (kerr.KafkaConnectionError("Connection timed out"),
                      kerr.KafkaTimeoutError("Connection timed out"),
                      kerr.KafkaConnectionError("Handshake failed: no TLS answer from b:9092: "
                                                "timed out")):
        with pytest.raises(BrokerNotTrusted) as raised:
            with connecting("connecting the consumer"):
                _logged_on_a_new_thread(UNTRUSTED, timed_out)
                raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
        assert "certificate verify failed: self-signed certificate" in str(raised.value)


def test_what_connecting_watches_is_let_go_afterwards():
    handlers = list(logging.getLogger("kafka").handlers)
    with pytest.raises(BrokerUnavailable), connecting("connecting the producer"):
        raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    with connecting("connecting the producer"):
        pass
    assert logging.getLogger("kafka").handlers == handlers


def test_an_attempt_that_timed_out_is_named_and_not_taken_for_the_end_of_the_bootstrap():
    timed_out = kerr.KafkaTimeoutError("Connection timed out")  # (the class of the end, too)
    with pytest.raises(BrokerUnavailable, match=r"the last attempt: KafkaTimeoutError: "
                                                r"Connection timed out\)$"):
        with connecting("connecting the consumer"):
            _logged_on_a_new_thread(kerr.KafkaConnectionError("111 ECONNREFUSED"), timed_out)
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")


def test_a_failure_other_than_the_bootstrap_timeout_keeps_its_own_message():
    # (a refusal from an earlier attempt, then connected: what failed after is what to say)
    with pytest.raises(BrokerUnavailable) as raised:
        with connecting("connecting the admin client"):
            _logged_on_a_new_thread(REFUSED)
            raise kerr.NodeNotReadyError("controller")
    assert not isinstance(raised.value, AuthenticationFailed)
    assert str(raised.value) == ("connecting the admin client failed: NodeNotReadyError: "
                                 "controller")


def test_a_refusal_is_seen_at_log_level_error_too(caplog):
    caplog.set_level(logging.ERROR, logger="kafka")  # STREAMER_LOG__LEVEL=ERROR

    def io_thread() -> None:  # what kafka-python logs at ERROR as it drops the connection
        logging.getLogger("kafka.net.transport").warning("not made at ERROR: %s", REFUSED)
        logging.getLogger("kafka.net.transport").error("%s: Abort (%s)", "transport", REFUSED)

    with pytest.raises(AuthenticationFailed, match="Invalid username"):
        with connecting("connecting the consumer"):
            thread = threading.Thread(target=io_thread)
            thread.start()
            thread.join()
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")


def test_an_error_is_described_by_its_type_once_and_never_as_none():
    # kafka-python's errors start their str() with their class name, and one raised without a
    # message says "None": logs read "KafkaTimeoutError: KafkaTimeoutError: ..." and
    # "committing offsets failed: KafkaTimeoutError: None".
    assert describe(kerr.KafkaTimeoutError("Timeout after 5.0 secs")) == \
        "KafkaTimeoutError: Timeout after 5.0 secs"
    assert describe(kerr.KafkaTimeoutError()) == "KafkaTimeoutError"
    assert describe(kerr.KafkaTimeoutError(None)) == "KafkaTimeoutError"
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(ValueError("ValueErrorish")) == "ValueError: ValueErrorish"
    assert describe(OSError()) == "OSError"
    assert str(convert(kerr.KafkaTimeoutError(), "committing offsets")) == \
        "committing offsets failed: KafkaTimeoutError"


TLS_HINT = " (does that listener speak TLS? STREAMER_KAFKA__SECURITY_PROTOCOL is SSL)"
PLAINTEXT_HINT = (" (if that listener speaks TLS, STREAMER_KAFKA__SECURITY_PROTOCOL must be SSL "
                  "or SASL_SSL, not PLAINTEXT)")


@pytest.mark.parametrize("reason", [
    # kafka-python (streamer.kafka.connection's bounded handshake; Python's ssl module)
    "KafkaConnectionError: Handshake failed: no TLS answer from b:9092: timed out",
    "KafkaConnectionError: Handshake failed: EOF occurred in violation of protocol (_ssl.c:1006)",
    "KafkaConnectionError: Handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number",
    # librdkafka's FAIL lines
    "ssl://b:9092/bootstrap: Connection setup timed out in state SSL_HANDSHAKE (after 5005ms "
    "in state SSL_HANDSHAKE)",
    "ssl://b:9092/bootstrap: SSL handshake failed: Disconnected: connection closed by peer "
    "(after 3ms in state SSL_HANDSHAKE)",
])
def test_a_tls_handshake_cut_short_or_unanswered_asks_whether_the_listener_speaks_tls(reason):
    assert listener_hint("SSL", reason) == TLS_HINT
    assert listener_hint("SASL_SSL", reason).startswith(" (does that listener speak TLS?")


@pytest.mark.parametrize("reason", [
    "KafkaConnectionError: [Errno 104] Connection reset by peer",
    "KafkaConnectionError: socket disconnected",
    "b:9092/bootstrap: Disconnected: connection reset by peer (after 0ms in state "
    "APIVERSION_QUERY)",
])
def test_a_connection_dropped_before_any_answer_names_tls_to_a_plaintext_client(reason):
    assert listener_hint("PLAINTEXT", reason) == PLAINTEXT_HINT
    assert "not SASL_PLAINTEXT)" in listener_hint("SASL_PLAINTEXT", reason)


@pytest.mark.parametrize(("protocol", "reason"), [
    ("SSL", "KafkaConnectionError: 111 ECONNREFUSED"),  # nothing listens: not a kind of listener
    ("SSL", "b:9092/bootstrap: Connect to ipv4#10.0.0.1:9092 failed: Connection refused"),
    ("SSL", "KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: self-signed certificate"),
    ("SSL", "KafkaConnectionError: Connection reset by peer"),  # after its handshake
    ("PLAINTEXT", "KafkaConnectionError: 111 ECONNREFUSED"),
    ("PLAINTEXT", "b:9092/1: Disconnected: connection closed by peer: receive 0 after POLLIN "
                  "(after 5454ms in state UP)"),  # a broker restarting, after it answered
    ("PLAINTEXT", "b:9092/bootstrap: Failed to resolve 'b:9092': Name or service not known"),
])
def test_other_connection_failures_get_no_hint_about_the_listener(protocol, reason):
    assert listener_hint(protocol, reason) == ""


def test_a_bootstrap_timeout_adds_the_hint_for_its_clients_security_protocol():
    reset = kerr.KafkaConnectionError("[Errno 104] Connection reset by peer")
    for protocol, hint in (("PLAINTEXT", PLAINTEXT_HINT), ("SSL", "")):
        with pytest.raises(BrokerUnavailable) as raised:
            with connecting("connecting the admin client", protocol):
                _logged_on_a_new_thread(reset)
                raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
        assert str(raised.value) == (
            "connecting the admin client failed: KafkaTimeoutError: Unable to bootstrap from "
            "b:9092 (the last attempt: KafkaConnectionError: [Errno 104] Connection reset by "
            f"peer){hint}")
