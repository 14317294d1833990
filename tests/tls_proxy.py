"""Real TLS in front of the local broker, for the clients' SSL settings end to end.

Tansu 0.6's own TLS listener (``--cert``) never completed a handshake here. Kafka over TLS is
the plaintext protocol inside a TLS session on the same socket, so this proxy ends each
client's TLS session (Python's ssl: TLS 1.2/1.3, the client certificate required and checked
against a CA when mutual) and passes the bytes on to the real broker, which advertises the
proxy's address. What each client presented is recorded for the test to check.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from streamer.kafka.broker import free_port, resolve_broker_binary


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

    def __init__(self, files: dict[str, Path], *, mutual: bool = True) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(files["server"], files["server_key"])
        if mutual:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(files["ca"])
        self._listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self._listener.getsockname()[1]
        self._upstream = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.client_names: list[str] = []  # the CN of each client certificate accepted
        self.refused: list[str] = []  # why each failed handshake failed
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsBroker:
        self._proc = subprocess.Popen(
            [resolve_broker_binary(), "broker", "--cluster-id", f"tls-{self.port}",
             "--listener-url", f"tcp://127.0.0.1:{self._upstream}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not _accepts(self._upstream):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the broker behind the TLS proxy did not start on "
                                   f"{self._upstream}")
            time.sleep(0.05)
        threading.Thread(target=self._accept, daemon=True, name="tls-proxy").start()
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused.append(str(exc))
            raw.close()
            return
        client.settimeout(None)
        peer = client.getpeercert() or {}
        names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        self.client_names.extend(names)
        upstream = socket.create_connection(("127.0.0.1", self._upstream))
        with self._lock:
            self._sockets += [client, upstream]
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
