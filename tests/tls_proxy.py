"""Real TLS in front of the local broker, for the clients' SSL settings end to end.

Tansu 0.6's own TLS listener (``--cert``) never completed a handshake here. Kafka over TLS is
the plaintext protocol inside a TLS session on the same socket, so this proxy ends each
client's TLS session (Python's ssl: TLS 1.2/1.3, the client certificate required and checked
against a CA when mutual) and passes the bytes on to the real broker, which advertises the
proxy's address. What each client presented is recorded for the test to check.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamer.kafka.broker import (
    broker_command,
    free_port,
    port_accepts,
    resolve_broker_binary,
)


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


class TlsBroker:
    """A Tansu broker reached only through a TLS proxy: ``bootstrap`` is the proxy's."""

    def __init__(self, files: dict[str, Path], log_path: Path, *, mutual: bool = True) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(files["server"], files["server_key"])
        if mutual:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(files["ca"])
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.client_names: list[str] = []  # the CN of each client certificate accepted
        self.refused: list[str] = []  # why each failed handshake failed
        self._upstream = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsBroker:
        for _ in range(5):  # Tansu exits when its port is taken: another port, as LocalBroker
            if self._start_broker(free_port()):
                self._spawn(self._accept)
                return self
        self.__exit__()
        raise RuntimeError(f"the broker behind the TLS proxy did not start; see {self.log_path}")

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
                broker_command(resolve_broker_binary(), f"tls-{self.port}", port, self.port),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while self._proc.poll() is None and time.monotonic() < deadline:
            if port_accepts(port, timeout_s=0.5):
                time.sleep(0.2)  # (one that lost the port to another process exits at once)
                return self._proc.poll() is None
            time.sleep(0.05)
        return False

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="tls-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

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
        try:
            while not self._closed.is_set():
                ready = [client] if client.pending() else select.select(list(peer), [], [],
                                                                          0.2)[0]
                for sock in ready:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    peer[sock].sendall(chunk)
        except (OSError, ValueError):
            return  # a side closed (or the proxy, at its exit)
        finally:
            for sock in peer:
                sock.close()

