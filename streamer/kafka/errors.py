"""streamer's own infrastructure errors, converted at the edge from kafka-python's.

kafka-python is imported by the conversion, not by this module: the error types (and so the
client interface in streamer.kafka.client) stay importable without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KafkaClientError(Exception):
    """A Kafka operation failed in a way retrying the same call will not fix."""


class BrokerUnavailable(KafkaClientError):
    """The broker could not be reached or did not answer in time; retry with backoff."""


class CommitFailed(KafkaClientError):
    """Offsets were not committed because the group rebalanced; the records will be redelivered."""


class Unfixable(KafkaClientError):
    """Only an operator can fix it (no permission, failed authentication, a broker too old for
    the request, a cluster policy): retrying the same call will not help."""


class AuthenticationFailed(Unfixable):
    """The brokers refused the client's SASL credentials (or its mechanism): a setting to fix."""

    @classmethod
    def refused(cls, failure: str, reason: str) -> AuthenticationFailed:
        """Said alike by both clients: ``failure`` (what failed), the brokers' ``reason``."""
        return cls(f"{failure}: the brokers refused the credentials: {reason}")


class BrokerNotTrusted(AuthenticationFailed):
    """The client could not verify the brokers' TLS certificate (signed by a CA it was not
    given, or issued for another host name): a setting to fix, as the Java client's
    SslAuthenticationException is an authentication failure."""

    @classmethod
    def untrusted(cls, failure: str, reason: str) -> BrokerNotTrusted:
        """Said alike by both clients: ``failure`` (what failed), the handshake's ``reason``."""
        return cls(f"{failure}: the brokers' TLS certificate was not trusted: {reason}")


# How OpenSSL ends a verification of the peer's certificate that failed (librdkafka reports
# it in that text only; kafka-python raises ssl.SSLCertVerificationError, whose text it is too).
CERTIFICATE_NOT_VERIFIED = "certificate verify failed"


class TopicCreationRefused(Unfixable):
    """The cluster refused to create a topic (no permission, a policy, too few brokers for the
    replication factor): retrying will not help, an operator must create it or fix the setting."""


class TopicMissing(KafkaClientError):
    """A topic that an operation depends on does not exist (yet)."""


class UndecodableBatch(KafkaClientError):
    """A fetched record batch cannot be decoded (unknown codec, corrupt data, failed CRC).

    Retrying cannot help: the same bytes come back. The client has paused the partition at
    ``offset`` (nothing before it is lost, nothing after it is skipped); the others go on.
    """

    def __init__(self, partition: tuple[str, int], offset: int, cause: str):  # a PartitionId
        topic, number = partition
        super().__init__(f"partition {topic}[{number}] at offset {offset}: {cause}")
        self.partition, self.offset, self.cause = partition, offset, cause


class LocalBrokerError(Exception):
    """The local test broker could not be started or stopped."""


def describe(exc: BaseException) -> str:
    """``Type: message`` for any exception, the type said once: kafka-python's errors already
    start their str() with their class name, and one raised without a message says "None"."""
    name, text = type(exc).__name__, str(exc)
    if text == name or text.startswith(name + ":"):
        text = text[len(name) + 1:].strip()
    return name if text in ("", "None") else f"{name}: {text}"


def convert(exc: Exception, action: str) -> KafkaClientError:
    """The project's exception for a kafka-python error raised while doing ``action``."""
    import kafka.errors as kerr

    # Membership errors mean our generation is stale: retrying the same commit cannot succeed,
    # the partitions may already belong to another member, so the caller must drop the batch's
    # offsets.
    membership = (kerr.CommitFailedError, kerr.RebalanceInProgressError,
                  kerr.IllegalGenerationError, kerr.UnknownMemberIdError)
    # Errors that say who we are or what the cluster allows, not how it is doing right now.
    unfixable = (kerr.AuthorizationError, kerr.UnsupportedVersionError,
                 kerr.PolicyViolationError, kerr.InvalidReplicationFactorError,
                 kerr.KafkaConfigurationError)
    message = f"{action} failed: {describe(exc)}"
    if isinstance(exc, membership):
        return CommitFailed(message)
    if isinstance(exc, _refusals()):
        return AuthenticationFailed(message)
    if isinstance(exc, unfixable):
        return Unfixable(message)
    # Every retriable kafka-python error (timeouts, lost connections, leader moves, coordinator
    # unknown) means "the cluster is not answering right now", which is what backoff is for.
    if getattr(exc, "retriable", False) or isinstance(exc, kerr.KafkaTimeoutError):
        return BrokerUnavailable(message)
    return KafkaClientError(message)


@contextmanager
def converted_errors(action: str) -> Iterator[None]:
    """Re-raise kafka-python errors inside the block as the project's own. kafka-python's
    admin client raises a bare RuntimeError when the controller moved twice in a row (a
    failover): BrokerUnavailable here (retry later), not a crash."""
    import kafka.errors as kerr

    try:
        yield
    except kerr.KafkaError as exc:
        raise convert(exc, action) from exc
    except RuntimeError as exc:
        if "controller" not in str(exc):
            raise
        raise BrokerUnavailable(f"{action} failed: {exc}") from exc


def _refusals() -> tuple[type[Exception], ...]:
    import kafka.errors as kerr

    return kerr.SaslAuthenticationFailedError, kerr.UnsupportedSaslMechanismError


def _timeout() -> type[Exception]:
    import kafka.errors as kerr

    return kerr.KafkaTimeoutError


class _BootstrapFailures(logging.Handler):
    """Keeps why kafka-python's bootstrap attempts failed: it logs each (the error as an
    argument: "Bootstrap connection to %s failed: %s" at WARNING, "Abort (%s)" at ERROR), tries
    again until its bootstrap timeout and then raises a bare KafkaTimeoutError, "Unable to
    bootstrap". Only records of the thread building the client or of threads started since
    (its IO thread: the library bootstraps on one or the other; another client started in
    the same moment would count too), and none after that final timeout."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.refused: list[str] = []  # the brokers refused the credentials
        self.last = ""  # the latest failure of any kind (a TLS handshake, a refused connection)
        # The latest failure that was the brokers' certificate not verified, unless an attempt
        # that got an answer failed otherwise since: one that timed out says nothing against
        # it (the last attempt of a short bootstrap, begun late in it, timed out connecting
        # to a busy TLS listener: "no broker answered" where the certificate was the reason).
        self.untrusted = ""
        self._ended = False  # the final "Unable to bootstrap" was logged
        self._older = set(threading.enumerate()) - {threading.current_thread()}

    def emit(self, record: logging.LogRecord) -> None:  # on the thread that logged it
        try:
            if self._ended or threading.current_thread() in self._older:
                return
            for arg in record.args if isinstance(record.args, tuple) else ():
                if _gave_up(arg):
                    self._ended = True
                elif isinstance(arg, _refusals()):
                    self.refused.append(str(arg))
                    self.last = str(arg)
                elif isinstance(arg, Exception):
                    self.last = str(arg)
                    if _not_verified(arg):
                        self.untrusted = str(arg)
                    elif not got_no_answer(arg):
                        self.untrusted = ""
        except Exception:  # noqa: BLE001 - never into the library's own error handling
            self.handleError(record)


def _not_verified(error: BaseException) -> bool:
    """kafka-python's KafkaConnectionError "Handshake failed: ..." raised while handling an
    ssl.SSLCertVerificationError (the brokers' certificate not trusted), or that error itself."""
    import ssl

    return isinstance(error, ssl.SSLCertVerificationError) or isinstance(
        error.__context__, ssl.SSLCertVerificationError)


def got_no_answer(failure: BaseException | str) -> bool:
    """A connection attempt that timed out (connecting, or waiting for a TLS handshake's
    answer), by its error (kafka-python) or its text (librdkafka's FAIL lines): it says
    nothing against why earlier ones failed (an untrusted certificate)."""
    return isinstance(failure, _timeout()) or "timed out" in str(failure).lower()


def _gave_up(error: object) -> bool:
    """kafka-python's end of a bootstrap: KafkaTimeoutError "Unable to bootstrap from ..."
    (the same class also ends single attempts: a connection or a SASL exchange timed out)."""
    return isinstance(error, _timeout()) and "Unable to bootstrap" in str(error)


def listener_hint(security_protocol: str, reason: str) -> str:
    """`` (what to check)`` where ``reason``, why connecting failed, is what a listener of the
    other kind gives. To a TLS client: a handshake that got no answer (a plaintext listener
    that reads the client's hello as the length of a request some 369 MB long and waits for
    the rest), was cut off (Apache Kafka closes a connection whose request is over its
    ``socket.request.max.bytes``) or was answered in something not TLS. To a client that does
    not speak TLS: a connection reset or closed before any answer (a TLS listener drops what
    is not a hello), not one lost after it worked (a broker restarting). Else ""."""
    text, tls = reason.lower(), security_protocol.upper().endswith("SSL")
    if tls:
        in_handshake = "handshake" in text or "no tls answer" in text
        cut_short = ("timed out", "eof", "wrong version", "wrong_version", "closed", "reset",
                     "disconnected")
        if in_handshake and any(said in text for said in cut_short):
            return (f" (does that listener speak TLS? STREAMER_KAFKA__SECURITY_PROTOCOL is "
                    f"{security_protocol})")
    elif (any(said in text for said in ("reset by peer", "disconnected", "closed by peer"))
          and "in state up" not in text):  # (librdkafka: a connection lost once it worked)
        return (f" (if that listener speaks TLS, STREAMER_KAFKA__SECURITY_PROTOCOL must be SSL "
                f"or SASL_SSL, not {security_protocol})")
    return ""


@contextmanager
def connecting(action: str, security_protocol: str = "PLAINTEXT") -> Iterator[None]:
    """``converted_errors`` around a kafka-python client's construction (its bootstrap), with
    a bootstrap that timed out while the brokers refused the credentials raised as
    AuthenticationFailed with the brokers' reason: a wrong password is a setting to fix, not
    "no broker answered" to retry for ever; so is a brokers' certificate this client does not
    trust when that was why the last attempt failed (BrokerNotTrusted); any other bootstrap
    timeout says why the last attempt failed (a connection refused, a name not resolved), and
    what to check where that is what a listener of the other kind gives (``listener_hint``:
    the client's ``security_protocol``).
    (Read from kafka-python's log records, those at ERROR included: the library keeps the
    reason nowhere else.)"""
    failures, library = _BootstrapFailures(), logging.getLogger("kafka")
    library.addHandler(failures)
    try:
        with converted_errors(action):
            yield
    except BrokerUnavailable as exc:
        if not _gave_up(exc.__cause__):  # another failure: its own message says what
            raise
        if failures.refused:
            raise AuthenticationFailed.refused(f"{action} failed", failures.refused[-1]) from exc
        if failures.untrusted:
            raise BrokerNotTrusted.untrusted(f"{action} failed", failures.untrusted) from exc
        if failures.last:
            raise BrokerUnavailable(f"{exc} (the last attempt: {failures.last})"
                                    f"{listener_hint(security_protocol, failures.last)}") from exc
        raise
    finally:
        library.removeHandler(failures)
