"""Readers for torch profiler output: Chrome traces (streamed) and ``key_averages`` tables.

* ``read_chrome_trace`` reads a trace written by ``prof.export_chrome_trace`` or
  ``torch.profiler.tensorboard_trace_handler`` (``.json`` or gzip-compressed ``.json.gz``,
  one file per rank) without loading it: the ``traceEvents`` array is decoded one event at a
  time from 1 MiB chunks, so a 200 MB trace needs a small fraction of its size in memory.
  Only what the bandwidth summary needs is kept: the annotated regions whose names pass a
  filter, the CUDA runtime calls (thread, time, correlation id) and the GPU time of each
  correlation id.
* ``read_key_averages_tables`` parses the text of ``prof.key_averages().table()``, which vLLM
  writes to ``profiler_out_<rank>.txt``; columns are located from the dashed separator line.

Every problem with an input file raises ``TraceError`` (a ``ValueError``) whose message names
the file and fits on one line.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = [
    "ChromeTrace",
    "KeyAveragesRow",
    "KeyAveragesTable",
    "TraceError",
    "iter_trace_events",
    "open_trace_file",
    "parse_time_us",
    "read_chrome_trace",
    "read_key_averages_tables",
    "sniff_trace_kind",
]

CHUNK_CHARS = 1 << 20
#: a single JSON value (one trace event, one metadata entry) larger than this is malformed
MAX_VALUE_CHARS = 64 << 20

_WS = re.compile(r"[ \t\n\r]*")


class TraceError(ValueError):
    """An input trace or table that cannot be read; the message names the file."""


# --------------------------------------------------------------------------- file access


def open_trace_file(path: str) -> tuple[IO[bytes], IO[bytes], int]:
    """Open ``path`` for reading, decompressing gzip transparently (detected by its magic
    bytes, not the suffix).

    Returns:
        ``(stream, raw, size)``: the decompressed byte stream, the underlying file (whose
        ``tell()`` is the number of bytes read from disk, for progress) and the file size.
    """
    if os.path.isdir(path):
        raise TraceError(f"{path}: is a directory; expected a trace file")
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot open ({exc.strerror or exc})") from None
    size = os.fstat(raw.fileno()).st_size
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw, size
    return raw, raw, size


def _read_error(path: str, exc: BaseException) -> TraceError:
    if isinstance(exc, EOFError):
        return TraceError(f"{path}: truncated gzip stream (the file ends before the "
                          "end-of-stream marker; was the trace still being written?)")
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return TraceError(f"{path}: corrupt gzip data ({exc})")
    return TraceError(f"{path}: read error ({exc})")


def sniff_trace_kind(path: str) -> str:
    """``"chrome"`` when the (decompressed) file starts with a JSON object or array,
    ``"table"`` when it holds a ``key_averages`` table, else raises ``TraceError``."""
    stream, raw, _ = open_trace_file(path)
    try:
        try:
            head = stream.read(64 << 10)
        except (EOFError, OSError, zlib.error) as exc:
            raise _read_error(path, exc) from None
    finally:
        stream.close()
        raw.close()
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not text:
        raise TraceError(f"{path}: empty file")
    if text[0] in "{[":
        return "chrome"
    if re.search(r"^-{4,}(?:  -{4,})+\s*$", text, re.M):
        return "table"
    raise TraceError(f"{path}: neither a Chrome trace (JSON) nor a torch key_averages table")


# --------------------------------------------------------------------------- JSON stream


class _JsonStream:
    """Pull parser over a byte stream holding one JSON document, decoding values with
    ``json.JSONDecoder.raw_decode`` from a sliding text buffer."""

    def __init__(self, stream: IO[bytes], where: str,
                 on_read: Callable[[], None] | None = None, chunk: int = CHUNK_CHARS):
        self._stream = stream
        self._where = where
        self._on_read = on_read
        self._chunk = chunk
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.base = 0  # characters dropped from the front of buf
        self.eof = False

    def offset(self) -> int:
        return self.base + self.pos

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self._stream.read(self._chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise _read_error(self._where, exc) from None
        text = self._utf8.decode(data, final=not data)
        if self.pos:
            self.base += self.pos
            self.buf = self.buf[self.pos:]
            self.pos = 0
        if self.buf:
            self.buf += text
        else:
            self.buf = text
        if not data:
            self.eof = True
        if self._on_read is not None:
            self._on_read()
        return True

    def peek(self) -> str:
        """The next non-whitespace character, without consuming it ('' at the end)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if c == "":
            raise self.truncated(f"expected {what}")
        if c not in chars:
            raise self.malformed(f"expected {what}, found {c!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        if self.peek() == "":
            raise self.truncated("expected a value")
        while True:
            try:
                obj, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # an error at the end of the buffer (or in a string running to it) may be
                # a value cut by the chunk boundary; anywhere else more data cannot help
                incomplete = (exc.pos >= len(self.buf) - 6
                              or exc.msg.startswith("Unterminated"))
                if not incomplete:
                    raise self.malformed(exc.msg, self.base + exc.pos) from None
                if self.eof:
                    raise self.truncated(exc.msg) from None
                if len(self.buf) - self.pos > MAX_VALUE_CHARS:
                    raise self.malformed(f"a value of more than {MAX_VALUE_CHARS} characters",
                                         self.offset()) from None
                self._fill()
                continue
            if end == len(self.buf) and not self.eof:
                self._fill()  # a number may continue in the next chunk
                continue
            self.pos = end
            return obj

    def truncated(self, what: str) -> TraceError:
        return TraceError(f"{self._where}: JSON ends unexpectedly at character "
                          f"{self.offset()} ({what}); the trace is truncated")

    def malformed(self, what: str, at: int | None = None) -> TraceError:
        return TraceError(f"{self._where}: malformed JSON at character "
                          f"{self.offset() if at is None else at}: {what}")


def iter_trace_events(stream: IO[bytes], where: str, metadata: dict[str, Any] | None = None,
                      on_read: Callable[[], None] | None = None) -> Iterator[dict]:
    """Yield the events of a Chrome trace one by one.

    Accepts the JSON object format (``{"traceEvents": [...], ...}``, what torch writes) and
    the bare JSON array format. Top-level keys other than ``traceEvents`` are stored into
    ``metadata`` (when given) as they are met. The whole document is checked: a missing
    bracket, trailing garbage or a truncated file raise ``TraceError``.
    """
    js = _JsonStream(stream, where, on_read)
    first = js.peek()
    if first == "\ufeff":
        js.pos += 1
        first = js.peek()
    if first == "[":
        js.pos += 1
        yield from _iter_array(js)
    elif first == "{":
        js.pos += 1
        found = False
        if js.peek() == "}":
            js.pos += 1
        else:
            while True:
                key = js.value()
                if not isinstance(key, str):
                    raise js.malformed(f"expected an object key, found {type(key).__name__}")
                js.expect(":", "':'")
                if key == "traceEvents":
                    js.expect("[", "'[' opening traceEvents")
                    found = True
                    yield from _iter_array(js)
                else:
                    val = js.value()
                    if metadata is not None:
                        metadata[key] = val
                if js.expect(",}", "',' or '}'") == "}":
                    break
        if not found:
            raise TraceError(f"{where}: JSON object without a 'traceEvents' array; "
                             "not a Chrome trace")
    elif first == "":
        raise TraceError(f"{where}: empty file")
    else:
        raise js.malformed(f"expected '{{' or '[' starting a Chrome trace, found {first!r}")
    if js.peek() != "":
        raise js.malformed("extra data after the end of the trace")


def _iter_array(js: _JsonStream) -> Iterator[Any]:
    if js.peek() == "]":
        js.pos += 1
        return
    while True:
        yield js.value()
        if js.expect(",]", "',' or ']' in traceEvents") == "]":
            return


# --------------------------------------------------------------------------- trace content

# event category -> role
_DEVICE, _RUNTIME, _CPU_REGION, _GPU_REGION, _SPAN = range(5)
_CATEGORIES = {
    "kernel": _DEVICE, "Kernel": _DEVICE,
    "gpu_memcpy": _DEVICE, "Memcpy": _DEVICE,
    "gpu_memset": _DEVICE, "Memset": _DEVICE,
    "cuda_runtime": _RUNTIME, "cuda_driver": _RUNTIME, "Runtime": _RUNTIME,
    "user_annotation": _CPU_REGION,
    "gpu_user_annotation": _GPU_REGION,
    "Trace": _SPAN,
}


@dataclass
class ChromeTrace:
    """What one Chrome trace holds for the bandwidth summary.

    Attributes:
        path: the file.
        cpu_regions: ``(name, pid, tid, ts_us, dur_us)`` of the kept ``user_annotation``
            (record_function) spans.
        gpu_regions: ``(name, ts_us, dur_us)`` of the kept ``gpu_user_annotation`` spans.
        launches: per ``(pid, tid)``, ``(ts_us, correlation)`` of each CUDA runtime/driver
            call (correlation None when the event has none; see ``flow_starts``).
        device_us: GPU time (kernels, memcpy, memset) per correlation id.
        device_events: number of GPU kernel/memcpy/memset events.
        device_total_us: their summed duration.
        device_ids: ``args["device"]`` values seen on GPU events.
        unlinked_device: ``(pid, tid, ts_us, dur_us)`` of GPU events without a correlation.
        flow_starts / flow_ends: ``(pid, tid, ts_us) -> id`` of ``ac2g`` flow events, used to
            link events that carry no correlation argument.
        span_us: the profiled wall time (the ``Trace`` span, or first to last event).
        metadata: the top-level keys other than ``traceEvents`` (``deviceProperties``...).
        events: number of events read.
    """

    path: str
    cpu_regions: list[tuple[str, Any, Any, float, float]] = field(default_factory=list)
    gpu_regions: list[tuple[str, float, float]] = field(default_factory=list)
    launches: dict[tuple[Any, Any], list[tuple[float, int | None]]] = field(
        default_factory=lambda: defaultdict(list))
    device_us: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    device_events: int = 0
    device_total_us: float = 0.0
    device_ids: set = field(default_factory=set)
    unlinked_device: list[tuple[Any, Any, float, float]] = field(default_factory=list)
    flow_starts: dict[tuple[Any, Any, float], int] = field(default_factory=dict)
    flow_ends: dict[tuple[Any, Any, float], int] = field(default_factory=dict)
    span_us: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    events: int = 0

    def device_names(self) -> dict[int, str]:
        """GPU index -> name from the trace's ``deviceProperties``."""
        out = {}
        props = self.metadata.get("deviceProperties")
        if isinstance(props, list):
            for p in props:
                if isinstance(p, dict) and "name" in p:
                    out[p.get("id", len(out))] = str(p["name"])
        return out

    def device_name(self) -> str | None:
        """The name of the GPU the kernels ran on (the first listed when several)."""
        names = self.device_names()
        for i in sorted(self.device_ids, key=str):
            if i in names:
                return names[i]
        return next(iter(names.values()), None)


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def read_chrome_trace(path: str, keep_region: Callable[[str], bool],
                      on_progress: Callable[[int, int], None] | None = None) -> ChromeTrace:
    """Stream a Chrome trace and keep what the bandwidth summary needs.

    Args:
        path: ``.json`` or ``.json.gz`` file.
        keep_region: called with each ``user_annotation`` / ``gpu_user_annotation`` name;
            only regions for which it returns True are kept.
        on_progress: called as ``on_progress(bytes_read_from_disk, file_size)`` after each
            chunk (for a gzip file, the position in the compressed file).
    """
    stream, raw, size = open_trace_file(path)
    out = ChromeTrace(path=path)
    notify = None if on_progress is None else (lambda: on_progress(raw.tell(), size))
    categories = _CATEGORIES
    launches = out.launches
    device_us = out.device_us
    first_ts = float("inf")
    last_end = float("-inf")
    trace_span = 0.0
    try:
        for ev in iter_trace_events(stream, path, out.metadata, notify):
            out.events += 1
            if type(ev) is not dict:
                raise TraceError(f"{path}: traceEvents[{out.events - 1}] is a "
                                 f"{type(ev).__name__}; expected an object")
            ph = ev.get("ph")
            if ph == "X":
                ts = ev.get("ts")
                dur = ev.get("dur", 0.0)
                if type(ts) is not float or type(dur) is not float:
                    ts, dur = _num(ts), _num(dur)
                    if ts is None or dur is None:
                        continue
                if ts < first_ts:
                    first_ts = ts
                if ts + dur > last_end:
                    last_end = ts + dur
                role = categories.get(ev.get("cat"))
                if role is None:
                    continue
                args = ev.get("args")
                if type(args) is not dict:
                    args = {}
                if role == _DEVICE:
                    out.device_events += 1
                    out.device_total_us += dur
                    dev = args.get("device")
                    if dev is not None:
                        out.device_ids.add(dev)
                    corr = args.get("correlation")
                    if corr is None:
                        out.unlinked_device.append((ev.get("pid"), ev.get("tid"), ts, dur))
                    else:
                        device_us[corr] += dur
                elif role == _RUNTIME:
                    launches[(ev.get("pid"), ev.get("tid"))].append(
                        (ts, args.get("correlation")))
                elif role == _CPU_REGION:
                    name = ev.get("name")
                    if isinstance(name, str) and keep_region(name):
                        out.cpu_regions.append((name, ev.get("pid"), ev.get("tid"), ts, dur))
                elif role == _GPU_REGION:
                    name = ev.get("name")
                    if isinstance(name, str) and keep_region(name):
                        out.gpu_regions.append((name, ts, dur))
                elif role == _SPAN:
                    trace_span += dur
            elif ph == "s" or ph == "f":
                if ev.get("cat") == "ac2g" and "id" in ev:
                    ts = _num(ev.get("ts"))
                    key = (ev.get("pid"), ev.get("tid"), ts)
                    (out.flow_starts if ph == "s" else out.flow_ends)[key] = ev["id"]
    finally:
        stream.close()
        raw.close()
    if out.events == 0:
        raise TraceError(f"{path}: the trace holds no events")
    out.span_us = trace_span or (last_end - first_ts if last_end > first_ts else 0.0)
    return out


# --------------------------------------------------------------------------- key_averages


_TIME = re.compile(r"^(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(us|ms|s)$")
_SEPARATOR = re.compile(r"^-+(?:  +-+)*\s*$")
_TOTAL_LINE = re.compile(r"^Self (\S+) time total:\s*(\S+)\s*$")


def parse_time_us(text: str) -> float | None:
    """``"12.345us"`` / ``"1.234ms"`` / ``"2.000s"`` (torch's table format) in microseconds;
    None for anything else."""
    m = _TIME.match(text.strip())
    if not m:
        return None
    return float(m.group(1)) * {"us": 1.0, "ms": 1e3, "s": 1e6}[m.group(2)]


@dataclass
class KeyAveragesRow:
    """One row of a ``key_averages`` table; times in microseconds, None where the table has
    no such column."""

    name: str
    calls: int
    self_cpu_us: float | None
    cpu_total_us: float | None
    self_device_us: float | None
    device_total_us: float | None
    truncated: bool  # torch cut the name to its column width and added "..."


@dataclass
class KeyAveragesTable:
    """A parsed ``key_averages().table()``: rows, the device label of the device columns
    (``"CUDA"``; None when the table has none) and the ``Self ... time total`` footers."""

    path: str
    headers: list[str]
    rows: list[KeyAveragesRow]
    device: str | None
    totals_us: dict[str, float]


_GAP = re.compile(r"\s{2,}")


def _cells(line: str, ends: list[int], count: int | None = None) -> list[str]:
    """Split a table line into cells. The name column never overflows (torch cuts names to
    its width); the others are separated by at least two spaces, but a cell may overflow its
    column (torch prints the 13-character "CUDA time avg" in a 12-character column), so
    they are split on runs of 2+ spaces, falling back to column positions when that does
    not give ``count`` cells (empty or space-holding cells)."""
    name = line[:ends[0]].strip()
    rest = line[ends[0]:].strip()
    cells = [name] + (_GAP.split(rest) if rest else [])
    if count is None or len(cells) == count:
        return cells
    out = [name]
    start = ends[0]
    for end in ends[1:]:
        out.append(line[start:end].strip())
        start = end
    return out


def read_key_averages_tables(path: str) -> list[KeyAveragesTable]:
    """Parse every ``key_averages`` table in a text file (vLLM's ``profiler_out_<rank>.txt``,
    or anything holding the output of ``prof.key_averages().table()``).

    Columns are located from the dashed separator line, so names with spaces and any subset
    of columns (memory, input shapes, overload names) are read correctly. Needs the ``Name``
    and ``# of Calls`` columns.
    """
    stream, raw, _ = open_trace_file(path)
    try:
        try:
            data = stream.read()
        except (EOFError, OSError, zlib.error) as exc:
            raise _read_error(path, exc) from None
    finally:
        stream.close()
        raw.close()
    lines = data.decode("utf-8", "replace").splitlines()
    tables: list[KeyAveragesTable] = []
    i = 0
    while i + 2 < len(lines):
        if not (_SEPARATOR.match(lines[i]) and _SEPARATOR.match(lines[i + 2])
                and lines[i + 1].strip().startswith("Name")):
            i += 1
            continue
        ends = [m.end() for m in re.finditer(r"-+", lines[i])]
        headers = _cells(lines[i + 1], ends)
        if len(headers) != len(ends):
            raise TraceError(f"{path}:{i + 2}: table header has {len(headers)} cells for "
                             f"{len(ends)} columns")
        if headers[0] != "Name" or "# of Calls" not in headers:
            raise TraceError(f"{path}:{i + 2}: table header {headers!r} lacks "
                             "'Name' or '# of Calls'")
        col = {h: j for j, h in enumerate(headers)}
        device = next((h[5:] for h in headers if h.startswith("Self ") and h != "Self CPU"
                       and not h.endswith(("%", "Mem"))), None)

        def time_cell(cells: list[str], header: str, lineno: int,
                      col: dict[str, int] = col) -> float | None:
            j = col.get(header)
            if j is None:
                return None
            v = parse_time_us(cells[j])
            if v is None:
                raise TraceError(f"{path}:{lineno}: column {header!r} holds {cells[j]!r}; "
                                 "expected a time like '12.345us'")
            return v

        rows = []
        j = i + 3
        while j < len(lines) and not _SEPARATOR.match(lines[j]):
            line = lines[j]
            j += 1
            if not line.strip():
                continue
            cells = _cells(line, ends, len(headers))
            if not cells[0]:
                continue  # continuation line of a stack column
            calls_text = cells[col["# of Calls"]]
            if not calls_text.isdigit():
                raise TraceError(f"{path}:{j}: '# of Calls' holds {calls_text!r}; "
                                 "expected an integer")
            rows.append(KeyAveragesRow(
                name=cells[0],
                calls=int(calls_text),
                self_cpu_us=time_cell(cells, "Self CPU", j),
                cpu_total_us=time_cell(cells, "CPU total", j),
                self_device_us=None if device is None else time_cell(cells, f"Self {device}", j),
                device_total_us=None if device is None else time_cell(cells, f"{device} total",
                                                                      j),
                truncated=cells[0].endswith("..."),
            ))
        totals: dict[str, float] = {}
        k = j + 1
        while k < len(lines) and k <= j + 3:
            m = _TOTAL_LINE.match(lines[k].strip())
            if m:
                v = parse_time_us(m.group(2))
                if v is not None:
                    totals[m.group(1)] = v
            k += 1
        tables.append(KeyAveragesTable(path=path, headers=headers, rows=rows, device=device,
                                       totals_us=totals))
        i = j + 1
    if not tables:
        raise TraceError(f"{path}: no key_averages table found (expected a header line "
                         "starting with 'Name' between dashed lines)")
    return tables
