"""Durable checkpoints: learner snapshot plus the next offset of every owned partition.

Layout of the checkpoint directory (shared by the workers of one group):

    <worker>-<seq>.ckpt   torch.save of tensors and plain data (loaded with weights_only=True)
    <worker>-<seq>.json   manifest: sha256 and size of the .ckpt, config fingerprint, offsets
    .<worker>.lock        held (flock) while a process writes as that worker: one at a time

A manifest is written (atomically) only after its data file is durable, so a manifest
always names a complete file; the checksum catches later corruption.

Pruning: after each save a worker keeps its own newest ``keep`` checkpoints, and deletes
another worker's checkpoint once every partition it held is held by a newer checkpoint of a
different worker that verifies (sha256) and that this version and configuration can restore:
its partitions have moved on (a pod that is gone, under a Deployment whose pod names, and so
worker ids, change with every restart). Without that, each rollout would leave its dead pods'
checkpoints on the shared volume for good. A live worker's own older checkpoints are never
superseded by its newer ones here (its ``keep`` fallbacks stay); a checkpoint is superseded
only by checkpoints of its own configuration and snapshot format (after a change of either, a
rollback still finds the old ones; written before manifests named their format, never).
Data files and temporary files that no manifest names are deleted once older than
``ORPHAN_AGE_S``: left by a crash between a data file and its manifest, or by a crash while a
worker deleted one of its own checkpoints (manifest first). Ours as well as other workers':
a crash between our data file and its manifest is healed by our next save, which reuses the
number, but one during our own deletion is not.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from streamer.core import snapshot as snap
from streamer.core.failpoints import failpoint
from streamer.kafka.client import PartitionId

log = logging.getLogger(__name__)

_WORKER = r"[A-Za-z0-9_.-]+"  # a worker id (config.CheckpointSettings.worker_id's pattern)
_NAME = re.compile(rf"^(?P<worker>{_WORKER})-(?P<seq>\d{{10}})\.json$")
_DATA = re.compile(rf"^\.?(?P<worker>{_WORKER})-(?P<seq>\d{{10}})\.(ckpt|json)(\.tmp)?$")
_LOCK = re.compile(rf"^\.(?P<worker>{_WORKER})\.lock$")  # _WorkerLock's
# A checkpoint write that failed having written within this of the room its directory has
# (what it wrote is deleted by then) failed for want of room (_no_room).
NO_ROOM_SLACK_BYTES = 1 << 20
_PARTITION_KEY = re.compile(r"[A-Za-z0-9._-]+:\d+")  # _key's: a topic name, its partition
# A data or temporary file without a manifest is left this long (seconds since it was last
# written) before it is deleted: a live writer is past it well before.
ORPHAN_AGE_S = 3600.0


class CheckpointError(Exception):
    """No usable checkpoint where one was required."""


class WorkerIdInUse(Exception):
    """Another running process writes checkpoints under this worker id in this directory."""


class _WorkerLock:
    """An exclusive lock (flock) on ``.<worker>.lock`` in the directory, held while any store
    of this process for that worker and directory lives: two processes numbering the same
    worker's checkpoints each from its own count overwrote and pruned each other's files (two
    workers on one host, the host name their default id). On a local file system the kernel
    drops it with the process (a SIGKILL leaves no stale lock); on a network one, as its lock
    service does (NFS: once the lease of a crashed host ends). Where the file system has no
    locks, a warning, and no check."""

    _held: dict[tuple[str, str], weakref.ReferenceType[_WorkerLock]] = {}
    ATTEMPTS = 20  # a pruner deleting the file (delete_if_free) holds it for microseconds

    @classmethod
    def take(cls, directory: Path, worker: str) -> _WorkerLock:
        key = (os.path.realpath(directory), worker)
        held = cls._held.get(key)
        lock = held() if held is not None else None
        # (another store of this process shares it: a restart in process; unless its file is
        # gone, deleted with the directory: then locked again)
        if lock is None or not lock.holds():
            lock = cls(directory / f".{worker}.lock", worker)
            cls._held[key] = weakref.ref(lock)
        return lock

    def __init__(self, path: Path, worker: str):
        for _ in range(self.ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.01)
                continue
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks
                log.warning("cannot lock %s (%s): a second worker with the id %r would not be "
                            "refused", path, exc.strerror or exc, worker)
            if _same_file(fd, path):  # not one a pruner deleted between our open and lock
                self._fd, self.path = fd, path
                weakref.finalize(self, os.close, fd)
                return
            os.close(fd)
        raise WorkerIdInUse(f"another running worker writes its checkpoints in "
                            f"{str(path.parent)!r} as {worker!r}")

    def holds(self) -> bool:
        """Whether the lock file is still the one locked (not deleted with its directory)."""
        return _same_file(self._fd, self.path)

    @staticmethod
    def delete_if_free(path: Path) -> None:
        """Delete a gone worker's lock file (no checkpoint of its left) once old, unless a
        process holds it: a Deployment's pods each leave one otherwise. Never raises: a lock
        file it cannot open (another user's, a directory) stays."""
        try:
            if time.time() - path.stat().st_mtime <= ORPHAN_AGE_S:
                return
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):  # (while held: no process holds it then)
                path.unlink(missing_ok=True)
        except OSError:  # held (a worker of that id is back), or no locks here
            pass
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not deleted or replaced since)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint read back from disk."""

    path: Path
    worker: str
    seq: int
    created: float
    state: dict  # the learner snapshot (see streamer.core.snapshot)
    offsets: dict[PartitionId, int]  # next offset to apply, per partition
    sensors: dict[PartitionId, list[str]]  # the sensors whose readings came from it
    # The id of the topic each partition's offset is in (brokers since Kafka 2.8 give one): a
    # topic deleted and recreated under the same name has a new one. Empty when unknown.
    topic_ids: dict[PartitionId, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveStats:
    path: Path
    size_bytes: int
    duration_seconds: float


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename over ``path``, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data[: len(data) // 2])
            failpoint("checkpoint_half_written")
            handle.write(data[len(data) // 2 :])
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed attempt (a full disk) leaves nothing behind
        raise


def _save_atomic(path: Path, state: dict) -> tuple[int, str]:
    """``state`` serialized into ``path`` as ``_write_atomic`` does; returns size and sha256.

    torch.save streams the tensors straight into the file, hashed on the way: no copy of the
    whole checkpoint is ever held in memory or read back, and the serving thread is not kept
    from the interpreter for the length of a several-hundred-MB memcpy (measured with a 340 MB
    snapshot at 100k sensors).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    hashing = None
    try:
        with open(tmp, "wb") as handle:
            hashing = _HashingWriter(handle)
            snap.save(state, hashing)
            handle.flush()
            failpoint("checkpoint_data_unsynced")
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a failed attempt leaves no 340 MB file behind
        if isinstance(exc, Exception) and (full := _no_room(path.parent, exc, hashing)):
            raise OSError(errno.ENOSPC, full) from exc
        raise
    _publish(tmp, path)
    return hashing.size, hashing.digest.hexdigest()


def _no_room(directory: Path, exc: Exception, hashing: _HashingWriter | None) -> str:
    """What to say where a checkpoint failed for want of room in ``directory``, else "".
    torch's writer reports a write that failed there as "[enforce fail at
    inline_container.cc:672] . unexpected pos 394496 vs 394384", which said nothing of the
    disk (operator pass): it is taken for one when what had been written by then (now
    deleted; torch goes on writing into its buffer past the failure) is as much as the room
    the directory has, or when the error is ENOSPC."""
    written = hashing.size if hashing is not None else 0
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if getattr(exc, "errno", None) != errno.ENOSPC and written < free - NO_ROOM_SLACK_BYTES:
        return ""
    size = f", and this checkpoint is at least {written:,} bytes" if written else ""
    return f"no room for a checkpoint in {directory}: {free:,} bytes free{size} ({exc})"


class _HashingWriter:
    """A binary file's ``write`` that also feeds a SHA-256 (hashlib releases the interpreter
    lock for large buffers, as the file's write does)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.handle.write(view)

    def flush(self) -> None:
        self.handle.flush()


def _publish(tmp: Path, path: Path) -> None:
    """Rename a durable temporary file over ``path`` and make the rename durable."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key(tp: PartitionId) -> str:
    return f"{tp[0]}:{tp[1]}"


def _unkey(text: str) -> PartitionId:
    topic, _, partition = text.rpartition(":")
    return topic, int(partition)


def _checked(manifest: object) -> dict:
    """``manifest`` (parsed JSON) if its fields are of the kinds ``save`` writes, else
    ValueError saying which is not. A damaged or hand-edited manifest is skipped as a damaged
    checkpoint is: an offset of "abc" or null crashed every start-up with a traceback (every
    new worker id of the group, which starts from the group's newest checkpoint), and one of
    -5 was restored and crashed the seek at the next assignment (operator pass)."""
    if not isinstance(manifest, dict):
        raise ValueError(f"a manifest is a JSON object, not {type(manifest).__name__}")
    offsets = manifest.get("offsets")
    if not isinstance(offsets, dict):
        raise ValueError(f"offsets: an object of topic:partition to offset, not {offsets!r}")
    for key, offset in offsets.items():
        if not _PARTITION_KEY.fullmatch(key):
            raise ValueError(f"offsets: {key!r} is not topic:partition")
        if type(offset) is not int or offset < 0:
            raise ValueError(f"offsets: {key}: {offset!r} is not an offset (a whole number "
                             f">= 0)")
    for name, kind in (("worker", str), ("seq", int), ("created", (int, float))):
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{name}: {value!r} is not a {name}")
    if not math.isfinite(manifest["created"]):
        raise ValueError(f"created: {manifest['created']!r} is not a time")
    topic_ids = manifest.get("topic_ids") or {}
    if not isinstance(topic_ids, dict) or not all(map(_PARTITION_KEY.fullmatch, topic_ids)):
        raise ValueError(f"topic_ids: not an object of topic:partition to id: {topic_ids!r}")
    return manifest


class CheckpointStore:
    """Writes this worker's checkpoints and reads anyone's back, newest valid first."""

    def __init__(self, directory: str | Path, worker: str, fingerprint: str, keep: int = 3):
        if not re.fullmatch(_WORKER, worker):
            raise ValueError(f"worker id must be letters, digits, '_', '.', '-': {worker!r}")
        self.directory = Path(directory)
        self.worker, self.fingerprint, self.keep = worker, fingerprint, keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _WorkerLock.take(self.directory, worker)  # WorkerIdInUse
        mine = [seq for w, seq, _ in self._manifests() if w == worker]
        self._next_seq = max(mine, default=0) + 1
        self._verified: dict[str, bool] = {}  # manifest name -> its data file verifies
        self._damaged: set[str] = set()  # manifest names found unreadable (logged once)

    def save(self, state: dict, offsets: dict[PartitionId, int],
             sensors: dict[PartitionId, list[str]], created: float | None = None,
             topic_ids: dict[PartitionId, str] | None = None) -> SaveStats:
        """Write a checkpoint durably, then prune this worker's older ones beyond ``keep``.

        ``created``: the wall time the state was current (when it was copied; default now):
        what ``latest_for(newer_than=...)`` compares when partitions move."""
        started = time.perf_counter()
        if not self._lock.holds():  # (the directory deleted, say: no lock and no check then)
            if not self.directory.is_dir():
                log.warning("checkpoint directory %s is gone: making it again", self.directory)
                self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = _WorkerLock.take(self.directory, self.worker)  # WorkerIdInUse
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        stem = f"{self.worker}-{seq:010d}"
        payload = dict(state)
        payload["partitions"] = {_key(tp): list(ids) for tp, ids in sensors.items()}
        data_path = self.directory / f"{stem}.ckpt"
        size, sha256 = _save_atomic(data_path, payload)
        failpoint("checkpoint_before_manifest")
        manifest = {
            "format": "streamer.checkpoint/1",
            "worker": self.worker,
            "seq": seq,
            "created": time.time() if created is None else created,
            "fingerprint": self.fingerprint,
            "snapshot_format": state.get("format"),
            "data": data_path.name,
            "size": size,
            "sha256": sha256,
            "offsets": {_key(tp): int(o) for tp, o in offsets.items()},
            "topic_ids": {_key(tp): str(i) for tp, i in (topic_ids or {}).items()
                          if tp in offsets},
        }
        manifest_path = self.directory / f"{stem}.json"
        try:
            _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
        except BaseException:  # not left on a full disk: nothing would ever delete them
            manifest_path.unlink(missing_ok=True)  # (renamed, but its rename not durable)
            data_path.unlink(missing_ok=True)
            raise
        self._prune()
        return SaveStats(data_path, size, time.perf_counter() - started)

    def latest(self, prefer: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies, ``prefer``'s own before any other worker's;
        None if none. Each is read (and an unusable one logged) once."""
        candidates = [(w == prefer, created, path) for w, created, path in self._by_time()]
        for _, _, path in sorted(candidates, reverse=True):
            checkpoint = self._read(path)
            if checkpoint is not None:
                return checkpoint
        return None

    def latest_for(self, partition: PartitionId, newer_than: float = 0.0,
                   read: dict[Path, Checkpoint | None] | None = None) -> Checkpoint | None:
        """The most recently written valid checkpoint, by any worker, that holds ``partition``.

        ``read``: the checkpoint verified and loaded by an earlier call (kept here, the last one
        only: hundreds of MB apiece for a large fleet), so that the partitions of one
        assignment, mostly held by one checkpoint, read and hash it once, not once each, while
        the rebalance waits."""
        read = {} if read is None else read
        holding = [(created, path) for _, created, path in self._by_time(partition)
                   if created > newer_than]
        for _, path in sorted(holding, reverse=True):
            if path not in read:
                for loaded in [p for p, c in read.items() if c is not None]:
                    del read[loaded]  # one snapshot in memory at a time
                read[path] = self._read(path)
            if read[path] is not None:
                return read[path]
        return None

    def _by_time(self, partition: PartitionId | None = None) -> list[tuple[str, float, Path]]:
        """(worker, created, manifest path) of every readable manifest, optionally filtered."""
        return [(worker, created, path)
                for worker, created, path, manifest in self._parsed(self._manifests())
                if "offsets" in manifest
                and (partition is None or _key(partition) in manifest["offsets"])]

    def _parsed(self, listed: list[tuple[str, int, Path]]) -> list[tuple[str, float, Path, dict]]:
        """(worker, created, path, manifest) of those of ``listed`` that can be read now and
        have a creation time; the others are skipped: gone since listed (pruned), or damaged,
        which is logged once per manifest (a checkpoint an operator may have expected to be
        restored from)."""
        found = []
        for worker, _, path in listed:
            try:
                manifest = _checked(json.loads(path.read_text()))
                created = float(manifest["created"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if path.name not in self._damaged:
                    self._damaged.add(path.name)
                    log.error("checkpoint manifest %s unreadable, skipped: %s: %s", path.name,
                              type(exc).__name__, exc)
                continue
            found.append((worker, created, path, manifest))
        return found

    def has_any(self) -> bool:
        """Whether any checkpoint manifest exists, usable or not."""
        return bool(self._manifests())

    def _manifests(self) -> list[tuple[str, int, Path]]:
        found = []
        for path in self.directory.glob("*.json"):
            match = _NAME.match(path.name)
            if match:
                found.append((match["worker"], int(match["seq"]), path))
        return found

    def _read(self, manifest_path: Path) -> Checkpoint | None:
        """Verify and load one checkpoint; log and return None when it is unusable."""
        try:
            manifest = _checked(json.loads(manifest_path.read_text()))
            if manifest["fingerprint"] != self.fingerprint:  # not damage: a setting changed
                log.warning("checkpoint %s is of another model configuration (fingerprint %s, "
                            "this worker's %s: model shape settings changed), not restored",
                            manifest_path.name, manifest["fingerprint"], self.fingerprint)
                return None
            data = (self.directory / manifest["data"]).read_bytes()
            if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest[
                "sha256"
            ]:
                raise ValueError("checksum mismatch: the file is truncated or corrupt")
            state = snap.upgrade(snap.loads(data))
            if not isinstance(state, dict) or state.get("format") != snap.FORMAT:
                found = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"learner snapshot format {found!r} is not {snap.FORMAT!r} "
                                 "(written by another streamer version)")
            partitions = state.pop("partitions", {})
            return Checkpoint(
                path=manifest_path,
                worker=manifest["worker"],
                seq=manifest["seq"],
                created=float(manifest["created"]),
                state=state,
                offsets={_unkey(k): v for k, v in manifest["offsets"].items()},
                sensors={_unkey(k): list(v) for k, v in partitions.items()},
                topic_ids={_unkey(k): str(v)
                           for k, v in (manifest.get("topic_ids") or {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.error("checkpoint %s unusable, trying an older one: %s", manifest_path.name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - unpickling errors of many kinds: never fatal
            log.error("checkpoint %s unreadable, trying an older one: %s", manifest_path.name,
                      exc)
            return None

    def _prune(self) -> None:
        listed = self._manifests()
        found = self._parsed(listed)  # every manifest read once, for both kinds of pruning
        mine = sorted((seq, path) for w, seq, path in listed if w == self.worker)
        beyond = {path for _, path in mine[: max(0, len(mine) - self.keep)]}
        dropped = [(seq, path) for seq, path in mine
                   if path in beyond and not self._last_holder(path, found)]
        for _, path in dropped:
            _delete_checkpoint(path)
        gone = {path for _, path in dropped}
        self._prune_superseded([entry for entry in listed if entry[2] not in gone],
                               [entry for entry in found if entry[2] not in gone])

    def _last_holder(self, path: Path, found: list[tuple[str, float, Path, dict]]) -> bool:
        """Whether the checkpoint at ``path`` is the newest of its kind holding one of its
        partitions (``found``: the manifests, ``_parsed``). Ours beyond ``keep`` stays then: a
        partition we handed over is held by our revoke checkpoint alone until its new owner
        writes one (an idle partition: maybe not for long), and its state and committed offset
        must survive that owner's crash."""
        own = next(((c, m) for _, c, p, m in found if p == path), None)
        if own is None:
            return False  # unreadable: nothing it holds can be restored from it anyway
        created, manifest = own
        kind = (manifest.get("fingerprint"), manifest.get("snapshot_format"))
        if kind != (self.fingerprint, snap.FORMAT):
            return False  # of a configuration we left: count-based, as before (README)
        newer = [m for _, c, p, m in found if p != path and c >= created
                 and (m.get("fingerprint"), m.get("snapshot_format")) == kind]
        return any(not any(tp in (m.get("offsets") or {}) for m in newer)
                   for tp in manifest.get("offsets") or {})

    def _prune_superseded(self, listed: list[tuple[str, int, Path]],
                          found: list[tuple[str, float, Path, dict]]) -> None:
        """Delete another worker's checkpoint once every partition it held is held by a newer
        checkpoint of a different worker with the same config fingerprint and snapshot format
        whose data verifies, and data and temporary files that no manifest names (ours too),
        once old (module docstring). ``found``: those of ``listed`` that ``_parsed``
        could read (an unreadable one is neither deleted nor counted newer)."""
        named = {path.name for _, _, path in listed}
        usable = [(w, c, path, m) for w, c, path, m in found
                  if m.get("snapshot_format") is not None and isinstance(m.get("offsets"), dict)]
        self._verified = {k: v for k, v in self._verified.items() if k in named}
        for worker, created, path, manifest in found:
            if worker == self.worker:
                continue  # our own go by count (``keep``)
            kind = (manifest.get("fingerprint"), manifest.get("snapshot_format"))
            newer = sorted(((c, p, m) for w, c, p, m in usable if w != worker and c > created
                            and (m.get("fingerprint"), m.get("snapshot_format")) == kind),
                           key=lambda x: x[0], reverse=True)
            partitions = list(manifest.get("offsets") or {})
            # cheap test first; the data files are hashed only when all else says delete
            if not newer or not all(any(tp in m["offsets"] for _, _, m in newer)
                                    for tp in partitions):
                continue
            if all(any(tp in m["offsets"] and self._intact(p, m) for _, p, m in newer)
                   for tp in partitions) and any(self._intact(p, m) for _, p, m in newer):
                log.info("deleting checkpoint %s: newer checkpoints of other workers hold all "
                         "its partitions", path.name)
                _delete_checkpoint(path)
        now = time.time()
        for path in self.directory.iterdir():
            match = _DATA.match(path.name)
            if match is None or path.name in named:
                continue
            stem = f"{match['worker']}-{match['seq']}"
            if path.name == f"{stem}.ckpt" and (self.directory / f"{stem}.json").exists():
                continue  # its manifest: not an orphan
            try:
                if now - path.stat().st_mtime > ORPHAN_AGE_S:
                    log.info("deleting %s: no checkpoint manifest names it", path.name)
                    path.unlink()
            except FileNotFoundError:
                pass
        workers = {w for w, _, _ in self._manifests()}  # (after the deletions above)
        for path in self.directory.glob(".*.lock"):
            match = _LOCK.match(path.name)
            if match is not None and match["worker"] not in workers | {self.worker}:
                _WorkerLock.delete_if_free(path)

    def _intact(self, manifest_path: Path, manifest: dict) -> bool:
        """Whether the data file has the manifest's size and sha256 (cached per manifest:
        a manifest and its data are never rewritten under the same name)."""
        known = self._verified.get(manifest_path.name)
        if known is None:
            known = False
            try:
                data = self.directory / manifest["data"]
                if data.stat().st_size == manifest["size"]:
                    digest = hashlib.sha256()
                    with open(data, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                    known = digest.hexdigest() == manifest["sha256"]
            except (OSError, KeyError, TypeError):
                known = False
            self._verified[manifest_path.name] = known
        return known


def _delete_checkpoint(manifest: Path) -> None:
    """The manifest first (a reader that has it finds the data gone and falls back)."""
    for victim in (manifest, manifest.with_suffix(".ckpt")):
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
