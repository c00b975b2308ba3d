"""Line-numbered streaming of JSON records from JSONL files and JSON-array files.

The JSON data source (`contracts.data_sources`): a data file whose path no other source claims is
read by `iter_json_records`, which reports a bad record as every source does: `FILE:LINE: reason`.
Files are read in constant memory: JSONL line by line, a JSON array one element at a time (the array may be pretty-printed
over many lines; each element is reported at the line where it starts).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, TextIO

import msgspec

from contracts.errors import UserError

_CHUNK_BYTES = 1 << 16
_JSON_WHITESPACE = b" \t\r\n"
# Invalid bytes are decoded to lone surrogates (errors="surrogateescape") so that an array can be
# scanned past them and the bad element reported at its own line.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_NOT_WHITESPACE = re.compile(r"[^ \t\r\n]")
# Outside strings only these characters change the nesting; inside, only these end or escape it.
_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING_SPECIAL = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[,\] \t\r\n]")


class BadRecord(msgspec.Struct, frozen=True):
    """A record that could not be read or is not valid, with where it is and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def report_bad(
    bad: Sequence[object],
    *,
    on_bad_record: str,
    source: str,
    what: str,
    fix: str,
    error: type[Exception],
    log: TextIO,
    listed: int | None = None,
) -> None:
    """Print the bad records (`FILE:LINE: reason`; the first `listed` of them if given), then stop or
    skip as `data.on_bad_record` says. With "stop", `error` is raised once all are reported, so one
    pass shows everything to fix; with "skip", a line counts what was left out."""
    for item in bad[:listed]:
        print(item, file=log)
    if listed is not None and len(bad) > listed:
        print(f"... and {len(bad) - listed} more", file=log)
    if bad and on_bad_record == "stop":
        raise error(
            f"{source}: {len(bad)} {what}, listed above; {fix}, or set data.on_bad_record=skip to train on the rest"
        )
    if bad:
        print(f"{source}: skipped {len(bad)} {what}", file=log)


def iter_json_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any | BadRecord]]:
    """Yield `(line, record)` for each record of a JSONL or JSON-array file, or `(line, BadRecord)`.

    The layout is chosen by the first non-whitespace character: `[` means one JSON array, anything
    else JSONL (blank lines skipped). In JSONL a bad line is reported and reading goes on; in an
    array, broken JSON is reported once at the line where it broke and reading stops, because the
    element boundaries after it are unknown. Raises OSError if the file cannot be opened.
    """
    file = os.fspath(path)
    with open(file, "rb") as f:
        if _starts_with_array(f):
            yield from _array_records(f, file)
        else:
            yield from _jsonl_records(f, file)


def _starts_with_array(f: BinaryIO) -> bool:
    """Peek at the first non-whitespace byte (after a UTF-8 BOM) and rewind."""
    head = f.read(_CHUNK_BYTES).removeprefix(codecs.BOM_UTF8).lstrip(_JSON_WHITESPACE)
    while not head and (chunk := f.read(_CHUNK_BYTES)):
        head = chunk.lstrip(_JSON_WHITESPACE)
    f.seek(0)
    return head[:1] == b"["


def _jsonl_records(f: BinaryIO, file: str) -> Iterator[tuple[int, Any | BadRecord]]:
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, BadRecord(file, line_no, _not_utf8(raw[e.start]))
            continue
        # Without the line break a cut-off string is reported as "Unterminated string" rather than
        # "Invalid control character".
        text = text.rstrip("\r\n")
        if not text.strip(" \t\r\n"):
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, BadRecord(file, line_no, f"invalid JSON: {e.msg} (column {e.colno})")


def _not_utf8(byte: int) -> str:
    return f"not valid UTF-8 (byte 0x{byte:02x})"


class _TextStream:
    """The decoded text of a binary file, read in chunks, with the line and column of `pos`.

    `buf[pos:]` is the unread text; `fill` appends the next chunk and drops what was read, so
    offsets relative to `pos` stay valid across fills.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf = ""
        self.pos = 0
        self.line = 1
        self.column = 1

    def fill(self) -> bool:
        """Read one more chunk; False at end of file."""
        chunk = self._f.read(_CHUNK_BYTES)
        text = self._decoder.decode(chunk, final=not chunk)
        self.buf = self.buf[self.pos :] + text
        self.pos = 0
        return bool(chunk) or bool(text)

    def advance(self, new_pos: int) -> None:
        """Move `pos` forward, keeping line and column in step."""
        newlines = self.buf.count("\n", self.pos, new_pos)
        if newlines:
            self.line += newlines
            self.column = new_pos - self.buf.rfind("\n", self.pos, new_pos)
        else:
            self.column += new_pos - self.pos
        self.pos = new_pos

    def peek(self) -> str | None:
        """Skip JSON whitespace and return the next character, or None at end of file."""
        while True:
            m = _NOT_WHITESPACE.search(self.buf, self.pos)
            if m:
                self.advance(m.start())
                return m.group()
            self.advance(len(self.buf))
            if not self.fill():
                return None

    def line_of_last_text(self) -> int:
        """The line of the last non-whitespace character read so far."""
        return self.line + self.buf.rstrip(" \t\r\n").count("\n", self.pos)


class _Broken(UserError):
    """The array cannot be read past this point."""

    def __init__(self, record: BadRecord) -> None:
        super().__init__(str(record))
        self.record = record


class _Truncated(UserError):
    """The file ended inside an array element."""


def _array_records(f: BinaryIO, file: str) -> Iterator[tuple[int, Any | BadRecord]]:
    stream = _TextStream(f)
    try:
        yield from _array_elements(stream, file)
    except _Broken as e:
        yield e.record.line, e.record


def _array_elements(stream: _TextStream, file: str) -> Iterator[tuple[int, Any | BadRecord]]:
    stream.fill()
    if stream.buf.startswith("\ufeff"):
        stream.pos = 1
    stream.peek()
    stream.advance(stream.pos + 1)  # the opening "[", found by _starts_with_array
    opening_line = stream.line
    first = stream.peek()
    if first is None:
        raise _broken(stream, file, "unexpected end of file, the array is not closed with ']'", opening_line)
    if first == "]":
        _close_array(stream, file)
        return
    while True:
        start_line = stream.line
        record = _read_element(stream, file)
        yield (record.line if isinstance(record, BadRecord) else start_line), record
        # At end of file the report points at the last text, not at the trailing blank lines.
        last_line = stream.line
        separator = stream.peek()
        if separator == "]":
            _close_array(stream, file)
            return
        if separator is None:
            raise _broken(stream, file, "unexpected end of file, the array is not closed with ']'", last_line)
        if separator != ",":
            raise _broken(stream, file, f"expected ',' or ']' after a record, got {_shown(separator)}")
        stream.advance(stream.pos + 1)
        last_line = stream.line
        following = stream.peek()
        if following in (None, "]"):
            raise _broken(
                stream,
                file,
                f"expected a record after ',', got {_shown(following)}",
                last_line if following is None else None,
            )


def _broken(stream: _TextStream, file: str, message: str, line: int | None = None) -> _Broken:
    return _Broken(BadRecord(file, stream.line if line is None else line, f"invalid JSON: {message}"))


def _read_element(stream: _TextStream, file: str) -> Any | BadRecord:
    """Decode the array element at `pos` and move past it.

    Bytes that are not UTF-8 spoil only their own element; broken JSON ends the array.
    """
    start_line, start_column = stream.line, stream.column
    try:
        end = _element_end(stream)
    except _Truncated:
        raise _broken(
            stream,
            file,
            f"unexpected end of file, the record starting at line {start_line} is not closed",
            line=stream.line_of_last_text(),
        ) from None
    text = stream.buf[stream.pos : end]
    stream.advance(end)
    bad_byte = _ESCAPED_BYTE.search(text)
    if bad_byte:
        line = start_line + text.count("\n", 0, bad_byte.start())
        return BadRecord(file, line, _not_utf8(ord(bad_byte.group()) - 0xDC00))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        column = e.colno + (start_column - 1 if e.lineno == 1 else 0)
        raise _broken(stream, file, f"{e.msg} (column {column})", line=start_line + e.lineno - 1) from None


def _element_end(stream: _TextStream) -> int:
    """Index in `stream.buf` just past the JSON value starting at `pos`, reading more as needed.

    Only strings and brackets are tracked; whether the value is valid JSON is left to json.loads.
    Raises _Truncated if the file ends first.
    """
    if stream.buf[stream.pos] not in '{["':
        return _scalar_end(stream)
    depth, in_string, offset = 0, False, 0
    while True:
        buf, i = stream.buf, stream.pos + offset
        while True:
            m = (_STRING_SPECIAL if in_string else _STRUCTURE).search(buf, i)
            if m is None:
                i = len(buf)
                break
            c, i = m.group(), m.end()
            if c == "\\":
                if i == len(buf):  # the escaped character is in the next chunk: rescan from "\"
                    i -= 1
                    break
                i += 1
            elif c == '"':
                in_string = not in_string
                if depth == 0 and not in_string:
                    return i
            elif c in "{[":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i
        offset = i - stream.pos
        if not stream.fill():
            raise _Truncated


def _scalar_end(stream: _TextStream) -> int:
    offset = 0
    while True:
        m = _SCALAR_END.search(stream.buf, stream.pos + offset)
        if m:
            return m.start()
        offset = len(stream.buf) - stream.pos
        if not stream.fill():
            raise _Truncated


def _close_array(stream: _TextStream, file: str) -> None:
    """Move past the closing "]"; anything after it but whitespace is an error."""
    stream.advance(stream.pos + 1)
    extra = stream.peek()
    if extra is not None:
        raise _broken(stream, file, f"unexpected text after the end of the array: {_shown(extra)}")


def _shown(char: str | None) -> str:
    if char is None:
        return "end of file"
    if _ESCAPED_BYTE.match(char):
        return f"a byte that is not valid UTF-8 (0x{ord(char) - 0xDC00:02x})"
    return repr(char)


class FormatError(UserError, ValueError):
    """A decoded record does not fit its format; the message is the reason shown after FILE:LINE."""
