"""kafka-python reads a record whose header key is not UTF-8 instead of failing its batch.

The Kafka protocol says a header key is a UTF-8 string, but librdkafka and Go producers write
whatever bytes they are given. kafka-python decodes each key strictly, and one such key fails
the whole batch it is in: the worker could only hold its partition there, forever (a restart
reads the same bytes). Here the record is read with every byte of such a key outside ASCII
read as ``?`` (same length, so the record's framing is untouched; the key and value, and the
other headers, are exactly as written). The librdkafka client serves such a record without its
headers: confluent-kafka gives no way to read them.

kafka-python offers no hook for this, so its record reader (``DefaultRecordBatch._read_msg``,
pinned by tests/kafka/test_client.py for the kafka-python 3 this project depends on) is wrapped:
only when the strict read fails does the wrapper rewrite the failing keys in the batch's own
(already CRC-checked, decompressed) buffer and read the record again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_ASCII_FOR = bytes(b if b < 0x80 else ord("?") for b in range(256))
_installed = False
_install_lock = threading.Lock()  # the model topic's thread and the worker's may both install


def read_header_keys_leniently() -> None:
    """Install the wrapper (once per process; later calls do nothing)."""
    global _installed
    with _install_lock:
        if not _installed:
            _install()
            _installed = True


def _install() -> None:
    from kafka.record import default_records
    from kafka.record.util import decode_varint

    batch_class = default_records.DefaultRecordBatch
    strict = batch_class._read_msg
    said = False

    def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return strict(self, *args, **kwargs)
        except UnicodeDecodeError:
            if not _rewrite_header_keys(self._buffer, self._pos, decode_varint):
                raise
        record = strict(self, *args, **kwargs)
        nonlocal said
        if not said:
            said = True
            log.warning("offset %d: a header key is not UTF-8; records like it are served with "
                        "its bytes outside ASCII read as '?' (said once)", record.offset)
        return record

    batch_class._read_msg = _read_msg


def _rewrite_header_keys(buffer: bytearray, pos: int, decode_varint: Any) -> bool:
    """In the record at ``pos``, replace each byte outside ASCII of every header key that is
    not UTF-8 by ``?``; whether any was. A record whose framing does not add up is left as it
    is (False: it is broken some other way, and fails as before)."""
    bad: list[tuple[int, int]] = []
    try:
        length, pos = decode_varint(buffer, pos)
        start = pos
        for _field in range(3):  # attributes, timestamp delta, offset delta
            _, pos = decode_varint(buffer, pos)
        for _field in range(2):  # key, value
            size, pos = decode_varint(buffer, pos)
            pos += max(size, 0)
        count, pos = decode_varint(buffer, pos)
        for _header in range(count):
            size, pos = decode_varint(buffer, pos)
            if size < 0 or pos + size > len(buffer):
                return False
            try:
                bytes(buffer[pos:pos + size]).decode("utf-8")
            except UnicodeDecodeError:
                bad.append((pos, pos + size))
            pos += size
            size, pos = decode_varint(buffer, pos)
            pos += max(size, 0)
    except (IndexError, ValueError):
        return False
    if pos - start != length or pos > len(buffer):
        return False
    for begin, end in bad:
        buffer[begin:end] = bytes(buffer[begin:end]).translate(_ASCII_FOR)
    return bool(bad)
