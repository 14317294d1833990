"""Logging set-up: plain text for people or one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

from streamer.kafka.connection import LIBRDKAFKA_LOGGER

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...fields}``; fields come from ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# kafka-python logs every failed connection attempt, at ERROR, several lines each: a worker
# that could not reach its brokers for 20 s wrote 84 such lines against its own 9.
REPEAT_WINDOW_S = 60.0
# kafka-python's loggers, and the one librdkafka's lines go to (streamer.kafka.connection: with
# STREAMER_KAFKA__CLIENT=confluent, a 35 s outage printed 320 of them, 20 a second).
KAFKA_LIBRARIES = ("kafka", LIBRDKAFKA_LOGGER)
_NUMBERS = re.compile(r"\d+(\.\d+)?")


class RepeatFilter(logging.Filter):
    """Lets through one of the Kafka libraries' messages that differ only in their numbers
    (ports, node ids, backoffs) per REPEAT_WINDOW_S, the next one saying how many were left
    out; a different message (another cause) always passes. Streamer's own logs are never
    held."""

    def __init__(self, prefixes: tuple[str, ...] = KAFKA_LIBRARIES,
                 window_s: float = REPEAT_WINDOW_S, clock=time.monotonic):
        super().__init__()
        self.prefixes, self.window_s, self.clock = prefixes, window_s, clock
        self._seen: dict[tuple, list] = {}  # key -> [when shown, how many held since]

    def filter(self, record: logging.LogRecord) -> bool:
        if not _from(record, *self.prefixes):
            return True
        try:
            key = (record.name, record.levelno, _NUMBERS.sub("#", record.getMessage()))
        except Exception:  # noqa: BLE001 - a bad format is the handler's to report, not ours
            return True
        now, seen = self.clock(), self._seen.get(key)
        if seen is not None and now - seen[0] < self.window_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg, record.args = (f"{record.getMessage()} ({seen[1]} more like it in the "
                                       f"last {self.window_s:.0f} s not shown)"), None
        if len(self._seen) > 1000:  # a library logging ever new texts: start again
            self._seen.clear()
        self._seen[key] = [now, 0]
        return True


def _from(record: logging.LogRecord, *libraries: str) -> bool:
    """Logged by one of ``libraries`` (its top-level logger or one below it)."""
    return any(record.name == library or record.name.startswith(library + ".")
               for library in libraries)


def _is_kafka_error(arg: object, names: tuple[str, ...]) -> bool:
    """An instance of kafka.errors' classes ``names`` (or of a subclass), told without
    importing kafka-python (the confluent backend does without it)."""
    return any(c.__module__ == "kafka.errors" and c.__name__ in names
               for c in type(arg).__mro__)


def _args(record: logging.LogRecord) -> Iterable[object]:
    """A record's arguments, given as a tuple or as a mapping."""
    return record.args.values() if isinstance(record.args, dict) else record.args or ()


def drop_cancellations(record: logging.LogRecord) -> bool:
    """False for the Kafka library's reports of a request it cancelled because its connection
    was closed on purpose ("Metadata refresh: failed Cancelled", at ERROR): every clean stop
    that caught a request in flight printed one. The close itself is logged (INFO)."""
    if not _from(record, "kafka"):
        return True
    args = _args(record)
    return not any(_is_kafka_error(arg, ("Cancelled",)) for arg in args)


_TOPIC_NOT_FOUND = "Topic %s not found in cluster metadata"
KAFKA_METADATA_LOGGER = "kafka.cluster"  # the one that logs it


def missing_topic_as_warning(record: logging.LogRecord) -> bool:
    """The Kafka library's "Topic ... not found in cluster metadata", logged at ERROR every
    time it looks a missing topic up, as a WARNING (left out where warnings are): a worker
    waiting for its input topic says so itself (and exports streamer_input_topic_missing); an
    ERROR a minute from a state the worker handles would page whoever alerts on error logs.
    A filter of the library's logger, so that every handler sees the same level."""
    if record.levelno == logging.ERROR and record.msg == _TOPIC_NOT_FOUND:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return _warnings_shown()
    return True


def _warnings_shown() -> bool:
    """Whether the level chosen (the root logger's: configure_logging) shows warnings; the
    Kafka libraries' own loggers stay at WARNING whatever it is (configure_logging)."""
    return logging.getLogger().isEnabledFor(logging.WARNING)


# What the Kafka libraries log at ERROR for a broker they cannot reach or lost: kafka-python's
# errors of these classes among a record's arguments (each attempt, each connection lost, the
# bootstrap's end) or the socket's own error as the record's exception, librdkafka's lines of
# its FAIL facility.
# (A refusal of the credentials too, as librdkafka's FAIL lines include it: the worker says
# that itself, exit 2 at start-up, "broker trouble" later.)
_CONNECTION_ERRORS = ("KafkaConnectionError", "KafkaTimeoutError", "NodeNotReadyError",
                      "SaslAuthenticationFailedError")
_DISCONNECTED = "%s: socket disconnected"  # kafka-python's transport (its only argument)


def connection_failure_as_warning(record: logging.LogRecord) -> bool:
    """A Kafka library's report of a broker connection that failed or was lost, logged at
    ERROR (kafka-python: 6-8 lines as an outage begins, again each minute, ``RepeatFilter``
    thinning them; librdkafka: a FAIL line per connection), as a WARNING (left out where
    warnings are). The worker rides an outage out and says so itself: its WARNING "broker
    trouble" with the reason, /readyz, streamer_broker_errors_total and the
    StreamerBrokerTrouble alert. An ERROR line is for what it did not handle: whoever alerts on
    error logs was paged for every broker restart."""
    if record.levelno != logging.ERROR:
        return True
    args = _args(record)
    if _from(record, "kafka"):  # (a connection reset while reading: logged with its traceback)
        failed = (record.msg == _DISCONNECTED
                  or any(_is_kafka_error(arg, _CONNECTION_ERRORS) for arg in args)
                  or isinstance(record.exc_info and record.exc_info[1],
                                (ConnectionError, TimeoutError)))
    else:
        failed = _from(record, LIBRDKAFKA_LOGGER) and next(iter(args), None) == "FAIL"
    if not failed:
        return True
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    if record.exc_info:  # a connection reset's traceback says no more than its one line
        record.msg, record.args = f"{record.getMessage()} ({record.exc_info[1]!r})", None
        record.exc_info = record.exc_text = None
    return _warnings_shown()


def configure_logging(level: str = "INFO", fmt: str = "plain",
                      libraries_shown: bool = True) -> None:
    """Route all logs, Python's warnings too, to stderr in the chosen format (idempotent),
    the Kafka libraries' repeats thinned (``RepeatFilter``), its cancellations left out
    (``drop_cancellations``), a missing topic and a failed connection a warning
    (``missing_topic_as_warning``, ``connection_failure_as_warning``).
    ``libraries_shown`` False leaves the Kafka libraries' lines out of stderr (a command that
    reports its own failure in one line); they are still logged, for handlers that read them
    (``kafka.errors.connecting``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)  # (the Kafka libraries' loggers pass WARNING at every level)
    if not libraries_shown:
        handler.addFilter(lambda record: not _from(record, *KAFKA_LIBRARIES))
    handler.addFilter(drop_cancellations)
    handler.addFilter(connection_failure_as_warning)
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings (a library's DeprecationWarning, numpy's RuntimeWarning) through the
    # same handler: written raw to stderr, one broke a JSON log's one object per line.
    logging.captureWarnings(True)
    # The Kafka libraries at WARNING whatever the level shown: never below (kafka-python's
    # INFO is a line per connection and request), and never above, for their records are
    # read as well as shown: errors.connecting reads why a bootstrap failed from them (at
    # STREAMER_LOG__LEVEL=CRITICAL credentials the brokers refused were retried for ever,
    # where they stop the worker with exit 2). The handler above leaves out what is below
    # the level shown.
    for library in KAFKA_LIBRARIES:
        logging.getLogger(library).setLevel(logging.WARNING)
    logging.getLogger(KAFKA_METADATA_LOGGER).addFilter(missing_topic_as_warning)  # (once)
