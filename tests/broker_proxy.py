"""Real TLS and SASL in front of the local broker, for the clients' security settings end to end.

Tansu 0.6's own TLS listener (``--cert``) never completed a handshake here, and its SASL
(``--authentication``) cannot be given a user: ``tansu user create`` talks to the broker, which
refuses every request before authentication. Kafka over TLS is the plaintext protocol inside a
TLS session on the same socket, and SASL is a few requests at the start of a connection before
it, so this proxy ends each client's TLS session (Python's ssl: TLS 1.2/1.3, the client
certificate required and checked against a CA when mutual), then, when it has users,
authenticates the connection as a Kafka broker does (SaslHandshake and SaslAuthenticate,
PLAIN and SCRAM-SHA-256/512 per RFC 5802/7677; ApiVersions passed on to the broker), and then
passes the bytes on to the real broker, which advertises the proxy's address. What each client
presented is recorded for the tests to check.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamer.kafka import (
    ConsumerSettings,
    KafkaConnection,
    OutputRecord,
    ProducerSettings,
    ensure_topics,
    open_client,
)
from streamer.kafka.broker import (
    broker_command,
    free_port,
    port_accepts,
    resolve_broker_binary,
)


def round_trip(connection: KafkaConnection, client_kind: str, group_id: str,
               consumer_timeouts: dict[str, int], poll_until, value: bytes) -> list[bytes]:
    """Through ``connection``, one client of ``client_kind`` makes topic "readings", sends
    ``value`` to it and reads back what it holds: what each secured-connection test does."""
    ensure_topics(connection, {"readings": 1})
    client = open_client(client_kind, connection,
                         ConsumerSettings(group_id, **consumer_timeouts), ProducerSettings())
    try:
        client.subscribe(["readings"])
        client.wait(client.send([OutputRecord("readings", b"s1", value)]), 10)
        return [r.value for r in poll_until(client, 1, timeout_s=20)]
    finally:
        client.close(timeout_s=5.0)


def make_tls_files(folder: Path, key_password: str) -> dict[str, Path]:
    """A CA; a server certificate for 127.0.0.1 it signed; a client certificate it signed,
    with its private key encrypted under ``key_password`` (openssl, as operators make them)."""
    files = {name: folder / f"{name}.pem" for name in
             ("ca", "ca_key", "server", "server_key", "client", "client_key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    for name, subject, extra in (("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
                                 ("client", "/CN=streamer-client", "extendedKeyUsage=clientAuth")):
        csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
        ext.write_text(extra + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", str(files[f"{name}_key"]), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey",
            str(files["ca_key"]), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
            "-out", str(files[name]))
    plain = files["client_key"]
    files["client_key"] = folder / "client_key_encrypted.pem"
    run("pkey", "-in", str(plain), "-aes256", "-passout", f"pass:{key_password}",
        "-out", str(files["client_key"]))
    plain.unlink()
    return files


# -- SASL, as a Kafka broker serves it -------------------------------------------------------
API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58
SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
SCRAM_ITERATIONS = 4096  # Kafka's minimum
# As a broker (connection.failed.authentication.delay.ms): the connection is closed this long
# after the failure is answered, so that the client reads the answer before it sees the close.
FAILED_AUTHENTICATION_DELAY_S = 0.1


class _Refused(Exception):
    """The connection is closed here; the message says why."""


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:  # the client went away (gave up, or closed): no refusal of ours
            raise ConnectionResetError("the client closed the connection")
        data += chunk
    return bytes(data)


def _frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", _exactly(sock, 4))
    return _exactly(sock, size)


def _framed(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _as_uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos


def _request(frame: bytes) -> tuple[int, int, int, bytes]:
    """(api key, version, correlation id, body) of a SASL request (header v1, or v2 when the
    request is flexible: SaslAuthenticate from version 2)."""
    api_key, version, correlation, id_length = struct.unpack_from(">hhih", frame)
    pos = 10 + max(id_length, 0)
    if api_key == SASL_AUTHENTICATE and version >= 2:
        pos = _skip_tags(frame, pos)
    return api_key, version, correlation, frame[pos:]


def _handshake_response(correlation: int, error: int, mechanisms: tuple[str, ...]) -> bytes:
    names = b"".join(struct.pack(">h", len(m)) + m.encode() for m in mechanisms)
    return _framed(struct.pack(">ihi", correlation, error, len(mechanisms)) + names)


def _authenticate_token(version: int, body: bytes) -> bytes:
    if version >= 2:
        size, pos = _uvarint(body, 0)
        return body[pos:pos + size - 1]
    (size,) = struct.unpack_from(">i", body)
    return body[4:4 + size]


def _authenticate_response(correlation: int, version: int, error: int, message: str | None,
                           token: bytes) -> bytes:
    text = None if message is None else message.encode()
    if version >= 2:  # flexible: response header v1, compact fields, tagged fields
        out = struct.pack(">i", correlation) + b"\0" + struct.pack(">h", error)
        out += _as_uvarint(0 if text is None else len(text) + 1) + (text or b"")
        out += _as_uvarint(len(token) + 1) + token + struct.pack(">q", 0) + b"\0"
        return _framed(out)
    out = struct.pack(">ih", correlation, error)
    out += struct.pack(">h", -1) if text is None else struct.pack(">h", len(text)) + text
    out += struct.pack(">i", len(token)) + token
    if version >= 1:
        out += struct.pack(">q", 0)  # session lifetime: none
    return _framed(out)


def _plain(users: dict[str, str], token: bytes) -> str:
    """The user a PLAIN token authenticates (RFC 4616: authzid NUL user NUL password)."""
    try:
        _, user, password = token.decode().split("\0")
    except ValueError:
        raise _Refused("Authentication failed: malformed PLAIN token") from None
    if user not in users or not hmac.compare_digest(users[user].encode(), password.encode()):
        raise _Refused("Authentication failed: Invalid username or password")
    return user


class _Scram:
    """The server side of one SCRAM exchange (RFC 5802; SHA-256 and SHA-512: RFC 7677)."""

    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self.mechanism, self.users = mechanism, users
        self.hash = SCRAM_HASHES[mechanism]
        self.user = ""
        self._expected: tuple[str, str, str, bytes] | None = None  # gs2, nonce, first, salt

    def _mac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self.hash).digest()

    def step(self, token: bytes) -> tuple[bytes, bool]:
        """The server's answer to ``token``, and whether the exchange is complete."""
        try:
            return self._step(token.decode())
        except (ValueError, KeyError, IndexError) as exc:  # (UnicodeDecodeError, binascii)
            raise _Refused(f"Authentication failed: malformed SCRAM message ({exc})") from None

    def _step(self, text: str) -> tuple[bytes, bool]:
        failed = ("Authentication failed during authentication due to invalid credentials "
                  f"with SASL mechanism {self.mechanism}")
        if self._expected is None:  # client-first: gs2 header, n=user, r=client nonce
            flag, authzid, bare = text.split(",", 2)
            attrs = dict(item.split("=", 1) for item in bare.split(","))
            self.user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
            if self.user not in self.users:
                raise _Refused(failed)
            nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
            salt = os.urandom(16)
            first = f"r={nonce},s={base64.b64encode(salt).decode()},i={SCRAM_ITERATIONS}"
            self._expected = (f"{flag},{authzid},", nonce, f"{bare},{first}", salt)
            return first.encode(), False
        gs2, nonce, messages, salt = self._expected  # client-final: c=, r=, p=proof
        without_proof, _, proof = text.rpartition(",p=")
        attrs = dict(item.split("=", 1) for item in without_proof.split(","))
        if attrs.get("c") != base64.b64encode(gs2.encode()).decode() or attrs.get("r") != nonce:
            raise _Refused(failed)
        salted = hashlib.pbkdf2_hmac(self.hash, self.users[self.user].encode(), salt,
                                     SCRAM_ITERATIONS)
        client_key = self._mac(salted, b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        auth_message = f"{messages},{without_proof}".encode()
        signature = self._mac(stored_key, auth_message)
        recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash, recovered).digest(), stored_key):
            raise _Refused(failed)
        server_signature = self._mac(self._mac(salted, b"Server Key"), auth_message)
        return b"v=" + base64.b64encode(server_signature), True


class ProxiedBroker:
    """A Tansu broker reached only through a proxy that does TLS (``tls_files``: see
    make_tls_files) and/or SASL (``sasl_users``: user name -> password; PLAIN, SCRAM-SHA-256 and
    SCRAM-SHA-512 offered): ``bootstrap`` is the proxy's."""

    def __init__(self, log_path: Path, *, tls_files: dict[str, Path] | None = None,
                 mutual: bool = True, sasl_users: dict[str, str] | None = None) -> None:
        self._context: ssl.SSLContext | None = None
        if tls_files is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(tls_files["server"], tls_files["server_key"])
            if mutual:
                self._context.verify_mode = ssl.CERT_REQUIRED
                self._context.load_verify_locations(tls_files["ca"])
        self.sasl_users = sasl_users
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.client_names: list[str] = []  # the CN of each client certificate accepted
        self.authenticated: list[tuple[str, str]] = []  # (mechanism, user) of each SASL login
        self.refused: list[str] = []  # why each failed TLS handshake or SASL login failed
        self._upstream = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProxiedBroker:
        for _ in range(5):  # Tansu exits when its port is taken: another port, as LocalBroker
            if self._start_broker(free_port()):
                self._spawn(self._accept)
                return self
        self.__exit__()
        raise RuntimeError(f"the broker behind the proxy did not start; see {self.log_path}")

    def __exit__(self, *_: object) -> None:
        self._closed.set()
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:  # shutdown wakes a thread blocked on it; close alone does not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def _start_broker(self, port: int) -> bool:
        self._upstream = port
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                broker_command(resolve_broker_binary(), f"proxied-{self.port}", port, self.port),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while self._proc.poll() is None and time.monotonic() < deadline:
            if port_accepts(port, timeout_s=0.5):
                time.sleep(0.2)  # (one that lost the port to another process exits at once)
                return self._proc.poll() is None
            time.sleep(0.05)
        return False

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="broker-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def drop_connections(self) -> None:
        """Cut every client's connection (as a broker restart does): each must connect, and
        authenticate, again."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            self._sockets.append(sock)
        return not self._closed.is_set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if self._track(raw):
                self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        """One connection, both directions on this one thread (an SSL socket is not for two)."""
        raw.settimeout(10)
        client: socket.socket = raw
        if self._context is not None:
            try:
                client = self._context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.refused.append(str(exc))
                raw.close()
                return
            self.client_names += [value for rdn in (client.getpeercert() or {}).get("subject", ())
                                  for key, value in rdn if key == "commonName"]
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream), timeout=5)
        except OSError:
            client.close()
            return
        client.settimeout(30)
        upstream.settimeout(30)
        if not all([self._track(client), self._track(upstream)]):  # (both tracked)
            client.close()
            upstream.close()
            return
        peer = {client: upstream, upstream: client}
        pending = getattr(client, "pending", lambda: 0)  # bytes an SSL socket already decrypted
        try:
            if self.sasl_users is not None:
                self._authenticate(client, upstream)
            while not self._closed.is_set():
                ready = [client] if pending() else select.select(list(peer), [], [], 0.2)[0]
                for sock in ready:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    peer[sock].sendall(chunk)
        except _Refused as exc:
            self.refused.append(str(exc))
        except (OSError, ValueError, struct.error):
            return  # a side closed (or the proxy, at its exit)
        finally:
            for sock in peer:
                sock.close()

    def _authenticate(self, client: socket.socket, upstream: socket.socket) -> None:
        """Serve the connection's SASL requests as a broker does (ApiVersions answered by the
        broker); return once it is authenticated, raise _Refused (it is closed) if not."""
        assert self.sasl_users is not None
        mechanism, scram = "", None
        while True:
            frame = _frame(client)
            api_key, version, correlation, body = _request(frame)
            if api_key == API_VERSIONS:
                upstream.sendall(_framed(frame))
                client.sendall(_framed(_frame(upstream)))
            elif api_key == SASL_HANDSHAKE and version >= 1:
                (size,) = struct.unpack_from(">h", body)
                mechanism = body[2:2 + size].decode()
                offered = ("PLAIN", *SCRAM_HASHES)
                error = 0 if mechanism in offered else UNSUPPORTED_SASL_MECHANISM
                client.sendall(_handshake_response(correlation, error, offered))
                if error:
                    raise _Refused(f"mechanism {mechanism!r} is not enabled")
                scram = _Scram(mechanism, self.sasl_users) if mechanism in SCRAM_HASHES else None
            elif api_key == SASL_AUTHENTICATE and mechanism:
                token = _authenticate_token(version, body)
                try:
                    if scram is None:
                        user, reply, done = _plain(self.sasl_users, token), b"", True
                    else:
                        (reply, done), user = scram.step(token), scram.user
                except _Refused as exc:
                    client.sendall(_authenticate_response(correlation, version,
                                                          SASL_AUTHENTICATION_FAILED, str(exc),
                                                          b""))
                    time.sleep(FAILED_AUTHENTICATION_DELAY_S)
                    raise
                client.sendall(_authenticate_response(correlation, version, 0, None, reply))
                if done:
                    self.authenticated.append((mechanism, user))
                    return
            else:  # as a broker does: anything else before authentication closes the connection
                raise _Refused(f"request {api_key} v{version} before authentication")
