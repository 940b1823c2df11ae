"""The request journal's file: an append-only sequence of checksummed records.

Layout: the 8 bytes `MAGIC`, then records, each `<u32 length><u32 crc32>` (little
endian) followed by `length` bytes of UTF-8 JSON (an object). A record is written with
one `write` call on an unbuffered file, so a killed process leaves at most one torn
record, at the end. Reading stops at the first record that is short, fails its
checksum or is not a JSON object: everything before it is kept and the rest is cut off,
so a power cut or a SIGKILL mid-write is never a reason not to start.

`rewrite` (compaction) writes the live records to `<path>.tmp` and renames it over the
journal, so the journal is always either the old file or the new one. Nothing is
fsync'ed: the journal survives a process crash and a service restart (it lives in the
systemd runtime directory, a tmpfs, by default); flushing a board's eMMC for every
question would wear it for a guarantee the tmpfs cannot give anyway.

Test hook (tests/test_journal_faults.py): `kill_at` names a request id; when the
record of that request's acceptance is appended, half of it is written and the process
SIGKILLs itself, as a crash in the middle of a journal write would.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MAGIC = b"VLMDJ\x00\x00\x01"
_HEADER = struct.Struct("<II")  # body length, crc32 of the body
MAX_RECORD_BYTES = 64 * 2**20  # a length beyond this is garbage, not a record


class JournalFileError(OSError):
    """The journal file cannot be opened (another daemon holds it, or no permission)."""


@dataclass(frozen=True)
class StoredRecord:
    offset: int  # of its header in the file
    size: int  # header + body
    body: dict[str, Any]


def encode_record(body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def read_records(data: bytes) -> tuple[list[StoredRecord], int]:
    """The whole records in `data` (a journal file's bytes) and where the last one ends.

    A file without the magic (or empty) has no records and ends at 0.
    """
    if not data.startswith(MAGIC):
        return [], 0
    records, offset = [], len(MAGIC)
    while offset + _HEADER.size <= len(data):
        length, checksum = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            break
        body = data[start:end]
        if zlib.crc32(body) != checksum:
            break
        try:
            parsed = json.loads(body)
        except ValueError:
            break
        if not isinstance(parsed, dict):
            break
        records.append(StoredRecord(offset, end - offset, parsed))
        offset = end
    return records, offset


class RecordFile:
    """The open journal file: read once, then appended to, and rewritten when compacted."""

    def __init__(self, path: Path, kill_at: str | None = None):
        self.path = path
        self.kill_at = kill_at
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._file = open(path, "a+b", buffering=0)  # noqa: SIM115 (held open for appends)
        except OSError as exc:
            raise JournalFileError(exc.errno, f"cannot open the request journal {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise JournalFileError(0, f"another vlmd holds the request journal {path}") from None
        self.size = 0

    def read(self) -> tuple[list[StoredRecord], int]:
        """Every whole record, and how many bytes after them were cut off."""
        self._file.seek(0)
        data = self._file.read()
        records, end = read_records(data)
        if end == 0:
            self._file.truncate(0)
            self._write(MAGIC)
            self.size = len(MAGIC)
        else:
            self._file.truncate(end)
            self.size = end
        return records, len(data) - end

    def read_span(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(size)

    def append(self, body: dict[str, Any], kill_marker: str | None = None) -> tuple[int, int]:
        """Append one record; returns its (offset, size)."""
        record = encode_record(body)
        offset = self.size
        if self.kill_at is not None and kill_marker == self.kill_at:
            self._write(record[: len(record) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        self._write(record)
        self.size += len(record)
        return offset, len(record)

    def rewrite(self, records: Iterable[bytes]) -> list[tuple[int, int]]:
        """Replace the file by MAGIC + `records` (encoded records, in order); their new spans."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        spans, offset = [], len(MAGIC)
        with open(tmp, "wb") as out:
            out.write(MAGIC)
            for record in records:
                out.write(record)
                spans.append((offset, len(record)))
                offset += len(record)
        new = open(tmp, "a+b", buffering=0)  # noqa: SIM115
        fcntl.flock(new.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know the new file yet
        os.replace(tmp, self.path)
        self._file.close()
        self._file, self.size = new, offset
        return spans

    def close(self) -> None:
        self._file.close()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written:]
