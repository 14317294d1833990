"""kafka-python reads a record whose header key is not UTF-8 (streamer.kafka.header_keys)."""

from __future__ import annotations

import pytest
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from streamer.kafka.header_keys import read_header_keys_leniently
from tests.hostile_records import raw_header_key


def _batch(*headers: list[tuple[str, bytes]]) -> bytearray:
    """One uncompressed v2 batch of a record per header list (key k<i>, value v<i>)."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    for i, record_headers in enumerate(headers):
        builder.append(i, 1_700_000_000_000, f"k{i}".encode(), f"v{i}".encode(), record_headers)
    return builder.build()


def _read(buffer: bytearray) -> list[tuple[int, bytes, bytes, list]]:
    read_header_keys_leniently()
    return [(r.offset, r.key, r.value, r.headers) for r in DefaultRecordBatch(bytes(buffer))]


def test_bytes_outside_ascii_of_a_key_that_is_not_utf8_read_as_question_marks():
    buffer = _batch([("h", b"1")], [("é", b"2"), (raw_header_key(b"\xc3id\xff"), None)],
                    [("ü", b"3")])
    assert _read(buffer) == [(0, b"k0", b"v0", [("h", b"1")]),
                             (1, b"k1", b"v1", [("é", b"2"), ("?id?", None)]),
                             (2, b"k2", b"v2", [("ü", b"3")])]


def test_a_record_whose_framing_does_not_add_up_still_fails_its_batch():
    buffer = _batch([(raw_header_key(b"\xff"), b"1")])
    assert buffer[-4:] == b"\x02\xff\x021"  # key length 1 (zigzag), key, value length 1, value
    buffer[-2] = 4  # the value's length says 2: the record ends before its last header does
    with pytest.raises(CorruptRecordError, match="utf-8"):  # as without the wrapper
        _read(buffer)


def test_installing_again_from_any_thread_leaves_the_reader_wrapped_once():
    import threading

    read_header_keys_leniently()
    installed = DefaultRecordBatch._read_msg
    threads = [threading.Thread(target=read_header_keys_leniently) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert DefaultRecordBatch._read_msg is installed
