"""Logs: the Kafka library's repeated messages are thinned and its cancellations left out,
streamer's own never."""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Iterator

import kafka.errors as kerr
import pytest

from streamer.kafka.errors import AuthenticationFailed, connecting
from streamer.observability.logs import (
    KAFKA_METADATA_LOGGER,
    RepeatFilter,
    configure_logging,
    connection_failure_as_warning,
    drop_cancellations,
    missing_topic_as_warning,
)


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR,
            exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_the_librarys_repeats_pass_once_a_minute_saying_how_many_were_left_out():
    now = [0.0]
    kept = RepeatFilter(window_s=60.0, clock=lambda: now[0])
    refused = "Bootstrap connection to %s failed: %s (backoff %.2f secs)"
    shown = []
    for i in range(50):  # a failed connection every 0.1 s: other ports and backoffs each time
        now[0] = i * 0.1
        record = _record("kafka.net.manager", refused, f"127.0.0.1:{9000 + i}", "ECONNREFUSED",
                         0.05 + i / 1000)
        if kept.filter(record):
            shown.append(record.getMessage())
    assert len(shown) == 1
    now[0] = 61.0
    again = _record("kafka.net.manager", refused, "127.0.0.1:1", "ECONNREFUSED", 0.1)
    assert kept.filter(again)
    assert again.getMessage().endswith("(49 more like it in the last 60 s not shown)")


def test_librdkafkas_repeats_are_thinned_as_kafka_pythons_are():
    kept = RepeatFilter(clock=lambda: 0.0)
    failed = ("FAIL", "rdkafka#consumer-1", "[thrd:127.0.0.1:9/bootstrap]: Connect to "
              "ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)")
    shown = [kept.filter(_record("librdkafka", "%s [%s] %s", *failed)) for _ in range(20)]
    assert shown == [True] + [False] * 19


def test_another_cause_and_streamers_own_messages_always_pass():
    kept = RepeatFilter(clock=lambda: 0.0)
    assert kept.filter(_record("kafka.net.connection", "%s: Connection lost: %s", "a", "111"))
    assert kept.filter(_record("kafka.net.connection", "%s: Connection lost: %s", "a",
                               "[SSL] PEM lib"))  # a different cause is shown at once
    for _ in range(3):
        assert kept.filter(_record("streamer.worker", "broker trouble (%s)", "x",
                                   level=logging.WARNING))


def test_a_message_that_cannot_be_formatted_is_left_to_the_handler_not_raised_at_the_caller():
    # (a filter runs outside the handler's own guard: raising there reached kafka-python)
    assert RepeatFilter().filter(_record("kafka.conn", "%s and %s", "only one"))


def test_the_librarys_reports_of_requests_cancelled_by_a_close_are_left_out():
    # A clean stop that caught a metadata request in flight printed
    # "ERROR kafka.cluster: Metadata refresh: failed Cancelled".
    assert not drop_cancellations(_record("kafka.cluster", "Metadata refresh: failed %s",
                                          kerr.Cancelled()))
    assert not drop_cancellations(_record("kafka.coordinator", "%(e)s", {"e": kerr.Cancelled()}))
    assert drop_cancellations(_record("kafka.cluster", "Metadata refresh: failed %s",
                                      kerr.KafkaConnectionError("refused")))
    assert drop_cancellations(_record("streamer.worker", "%s", kerr.Cancelled()))
    assert drop_cancellations(_record("kafka.conn", "no arguments"))


def test_the_librarys_missing_topic_error_is_a_warning_and_everything_else_is_left_as_it_is():
    # kafka-python logs it at ERROR at each lookup while the worker waits for its input topic.
    missing = _record("kafka.cluster", "Topic %s not found in cluster metadata", "readings")
    assert missing_topic_as_warning(missing)
    assert (missing.levelno, missing.levelname) == (logging.WARNING, "WARNING")
    other = _record("kafka.cluster", "Metadata refresh: failed %s", "x")
    assert missing_topic_as_warning(other)
    assert (other.levelno, other.levelname) == (logging.ERROR, "ERROR")


def test_the_librarys_reports_of_a_failed_or_lost_connection_are_warnings_and_nothing_else():
    # (what kafka-python and librdkafka logged at ERROR while a worker rode an outage out:
    # tests/serving/test_worker.py has them from the real libraries)
    failed = [
        _record("kafka.net.manager", "Connection failed: %s",
                kerr.KafkaConnectionError("111 ECONNREFUSED")),
        _record("kafka.net.transport", "%s: socket disconnected", "<KafkaTCPTransport>"),
        _record("kafka.net.manager", "Bootstrap failed: %s",
                kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")),
        _record("kafka.coordinator", "Error sending %s to node %s [%s]", "FindCoordinator", 1,
                kerr.NodeNotReadyError(1)),
        _record("librdkafka", "%s [%s] %s", "FAIL", "streamer#consumer-1",
                "b:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused"),
        _record("kafka.net.transport", "%s: Error receiving network data closing socket",
                "<KafkaTCPTransport>", exc=ConnectionResetError(104, "Connection reset by peer")),
        _record("kafka.net.connection", "%s: Abort (%s)", "<KafkaConnection>",
                kerr.SaslAuthenticationFailedError("Invalid username or password")),
    ]
    for record in failed:
        assert connection_failure_as_warning(record)
        assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING"), record.msg
    # (the reset's traceback left out: its one line says as much)
    assert failed[5].getMessage() == ("<KafkaTCPTransport>: Error receiving network data closing "
                                      "socket (ConnectionResetError(104, 'Connection reset by "
                                      "peer'))") and failed[5].exc_info is None
    kept = [
        _record("kafka.coordinator", "Error: %s", kerr.UnknownTopicOrPartitionError("no")),
        _record("kafka.consumer.fetcher", "Failed to decode %s", "a batch"),
        _record("kafka.net.transport", "%s: Error receiving network data closing socket",
                "<KafkaTCPTransport>", exc=ValueError("a bug of the library's")),
        _record("librdkafka", "%s [%s] %s", "ERROR", "streamer#consumer-1", "something else"),
        _record("streamer.worker", "%s", kerr.KafkaConnectionError("ours: said as we mean it")),
    ]
    for record in kept:
        assert connection_failure_as_warning(record)
        assert record.levelno == logging.ERROR, record.msg
    warning = _record("kafka.net.manager", "Connection failed: %s",
                      kerr.KafkaConnectionError("x"), level=logging.WARNING)
    assert connection_failure_as_warning(warning) and warning.levelno == logging.WARNING


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root, metadata = logging.getLogger(), logging.getLogger(KAFKA_METADATA_LOGGER)
    kept = (root.handlers[:], root.level, logging.getLogger("kafka").level, metadata.filters[:])
    yield
    logging.captureWarnings(False)
    root.handlers[:], level, kafka_level, metadata.filters[:] = kept
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(kafka_level)


@pytest.mark.parametrize(("level", "shown"), [("INFO", ["WARNING"]), ("ERROR", [])])
def test_configured_logging_shows_every_handler_the_missing_topic_as_a_warning_or_not_at_all(
        logging_restored, level, shown):
    configure_logging(level)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.levelname)  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    logging.getLogger(KAFKA_METADATA_LOGGER).error("Topic %s not found in cluster metadata",
                                                   "readings")
    assert seen == shown


@pytest.mark.parametrize(("level", "shown"), [("INFO", ["WARNING"]), ("ERROR", []),
                                              ("CRITICAL", [])])
def test_configured_logging_shows_a_failed_connection_as_a_warning_or_not_at_all(
        logging_restored, capsys, level, shown):
    configure_logging(level)
    logging.getLogger("kafka.net.manager").error("Connection failed: %s",
                                                 kerr.KafkaConnectionError("111 ECONNREFUSED"))
    logging.getLogger("kafka.net.manager").warning("Bootstrap %s not ready; waiting %.2f secs",
                                                   "bootstrap-0", 0.5)
    assert [line.split()[2] for line in capsys.readouterr().err.splitlines()] == shown * 2


def test_python_warnings_are_logged_in_the_chosen_format(logging_restored, capsys):
    configure_logging("INFO", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("overflow encountered somewhere", RuntimeWarning, stacklevel=1)
    (entry,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert entry["level"] == "warning" and entry["logger"] == "py.warnings"
    assert "RuntimeWarning: overflow encountered somewhere" in entry["event"]


@pytest.mark.parametrize("level", ["INFO", "ERROR", "CRITICAL"])
def test_why_a_bootstrap_failed_is_read_from_the_library_whatever_the_level_shown(
        logging_restored, capsys, level):
    # At CRITICAL the library's loggers were set to CRITICAL: its WARNING records, the only
    # place it says the brokers refused the credentials, were never made, and the worker
    # retried a wrong password for ever instead of stopping with exit 2.
    configure_logging(level)
    refused = kerr.SaslAuthenticationFailedError("Authentication failed: Invalid password")

    def library_io_thread() -> None:  # (connecting reads the threads the client starts)
        manager = logging.getLogger("kafka.net.manager")
        manager.warning("Bootstrap connection to %s failed: %s", "bootstrap-0", refused)
        manager.error("Bootstrap failed: %s", kerr.KafkaTimeoutError("Unable to bootstrap"))

    with pytest.raises(AuthenticationFailed) as raised:
        with connecting("connecting the consumer"):
            thread = threading.Thread(target=library_io_thread)
            thread.start()
            thread.join()
            raise kerr.KafkaTimeoutError("Unable to bootstrap from b:9092")
    assert "Invalid password" in str(raised.value)
    shown = [line.split()[2] for line in capsys.readouterr().err.splitlines()]
    assert shown == {"INFO": ["WARNING", "WARNING"], "ERROR": [], "CRITICAL": []}[level]
