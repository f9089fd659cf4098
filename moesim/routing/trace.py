"""Recorded routing traces: reading (JSON lines or numpy ``.npz``) in bounded chunks, checks
with located errors, and a cursor that hands out consecutive tokens, cycling at the end.

Formats (docs/routing.md):

- JSON lines: one token per line, in order, ``{"step": s, "experts": [[ids at MoE layer
  0], [at layer 1], ...], "weights": [[...], ...]}``; ``step`` and ``weights`` optional
  (all lines or none); blank lines are skipped.
- ``.npz`` (``numpy.savez`` or ``savez_compressed``): ``experts`` int [tokens, moe_layers,
  top_k], optional ``weights`` float of the same shape, optional ``step`` int [tokens].

Both are read in chunks of :data:`CHUNK_TOKENS` tokens (an ``.npz`` member is streamed
from the archive, never loaded whole), so memory stays bounded by the chunk however long
the trace is.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

import numpy as np

CHUNK_TOKENS = 4096
"""Tokens read at a time."""
KEYS = frozenset({"experts", "step", "weights"})


class TraceError(ValueError):
    """A trace that cannot be used: the file, where in it (line or token) and what."""

    def __init__(self, file: str, where: str, message: str) -> None:
        self.file, self.where, self.message = file, where, message
        super().__init__(f"trace {file!r}: {where + ': ' if where else ''}{message}")


@dataclass(frozen=True)
class Chunk:
    """Consecutive tokens of a trace."""

    experts: np.ndarray
    """int32 [tokens, moe_layers, top_k]: each token's experts at each MoE layer."""
    weights: np.ndarray | None
    """float32, same shape: the gate weights, when recorded."""
    step: np.ndarray | None
    """int64 [tokens]: the iteration (step) each token ran in, when recorded."""


def _is_npz(path: str) -> bool:
    return path.lower().endswith(".npz")


# --- JSON lines -------------------------------------------------------------------


def _line_problem(line: str, shape: tuple[int, int] | None, weights: bool | None) -> str:
    """Why one JSON line is not a trace token (a message naming the field)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(row, dict):
        return 'expected an object {"experts": [[...], ...]}'
    extra = sorted(set(row) - KEYS)
    if extra:
        return f"unknown key {extra[0]!r} (expected experts, step, weights)"
    if "experts" not in row:
        return "experts: missing"
    for key in ("experts", "weights"):
        if key not in row:
            continue
        v = row[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, list) for x in v):
            return f"{key}: expected a list with one list per MoE layer"
        for i, x in enumerate(v):
            if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in x):
                return f"{key}[{i}]: expected numbers"
            if key == "experts" and not all(isinstance(e, int) for e in x):
                return f"experts[{i}]: expected integer expert ids"
        got = (len(v), len(v[0]))
        if any(len(x) != got[1] for x in v):
            return f"{key}: every MoE layer must list the same number of experts (top_k)"
        if shape is not None and got != shape:
            return (
                f"{key}: {got[0]} MoE layers x {got[1]} experts, the trace's first token has "
                f"{shape[0]} x {shape[1]}"
            )
    if weights is not None and ("weights" in row) != weights:
        return "weights: give them on every line or on none"
    if "step" in row and (not isinstance(row["step"], int) or isinstance(row["step"], bool)):
        return "step: expected an integer"
    return ""


def _json_chunks(path: str) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Chunks of a JSON-lines trace with each token's line number; TraceError located."""
    shape: tuple[int, int] | None = None
    has_w: bool | None = None
    has_step: bool | None = None
    with open(path, encoding="utf-8", errors="strict") as fh:
        number = 0
        while True:
            lines: list[str] = []
            numbers: list[int] = []
            try:
                for raw in fh:
                    number += 1
                    if raw.strip():
                        lines.append(raw)
                        numbers.append(number)
                        if len(lines) >= CHUNK_TOKENS:
                            break
            except UnicodeDecodeError:
                raise TraceError(path, f"line {number + 1}", "not UTF-8 text") from None
            if not lines:
                return
            try:
                rows = json.loads("[" + ",".join(lines) + "]")
                experts = np.array([r["experts"] for r in rows])
                keys = {k for r in rows for k in r}
                bad = bool(keys - KEYS) or experts.ndim != 3 or experts.dtype.kind not in "iu"
            except (ValueError, TypeError, KeyError, RecursionError):
                bad = True
            if not bad and shape is None:
                shape = (int(experts.shape[1]), int(experts.shape[2]))
                has_w, has_step = "weights" in rows[0], "step" in rows[0]
            if not bad:
                bad = experts.shape[1:] != shape
            w = st = None
            if not bad:
                try:
                    if has_w:
                        w = np.array([r["weights"] for r in rows], dtype=np.float64)
                        bad = w.shape != experts.shape
                    if has_step:
                        st = np.array([r["step"] for r in rows])
                        bad = bad or st.dtype.kind not in "iu"
                    bad = bad or any(("weights" in r) != has_w for r in rows)
                    bad = bad or any(("step" in r) != has_step for r in rows)
                except (ValueError, TypeError, KeyError):
                    bad = True
            if bad:  # find the first bad line (the error path only)
                for line, n in zip(lines, numbers):
                    why = _line_problem(line, shape, has_w)
                    if not why:
                        row = json.loads(line)
                        if has_step is not None and ("step" in row) != has_step:
                            why = "step: give it on every line or on none"
                        elif shape is None:
                            shape = (len(row["experts"]), len(row["experts"][0]))
                            has_w, has_step = "weights" in row, "step" in row
                    if why:
                        raise TraceError(path, f"line {n}", why)
                raise TraceError(
                    path, f"line {numbers[0]}", "not a trace token"
                )  # pragma: no cover
            yield (
                Chunk(
                    experts.astype(np.int64),
                    None if w is None else w,
                    None if st is None else st.astype(np.int64),
                ),
                np.asarray(numbers, dtype=np.int64),
            )


# --- npz ----------------------------------------------------------------------------


def _npy_stream(
    zf: zipfile.ZipFile, name: str, path: str
) -> tuple[IO[bytes], tuple[int, ...], np.dtype[Any]]:
    """An open member of an npz archive, positioned at its data, with shape and dtype."""
    f = zf.open(name)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError:
        f.close()
        raise TraceError(path, name, "not a .npy array") from None
    if fortran and len(shape) > 1:
        f.close()
        raise TraceError(path, name, "must be stored in C order (numpy's default)")
    if dtype.hasobject:
        f.close()
        raise TraceError(path, name, "object arrays are not read")
    return f, tuple(int(s) for s in shape), dtype


def _npz_chunks(path: str) -> Iterator[tuple[Chunk, np.ndarray]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise TraceError(path, "", "not an .npz archive (numpy.savez)") from None
    with zf:
        names = {n.removesuffix(".npy"): n for n in zf.namelist()}
        extra = sorted(set(names) - KEYS)
        if extra:
            raise TraceError(path, extra[0], "unknown array (expected experts, step, weights)")
        if "experts" not in names:
            raise TraceError(path, "experts", "missing (an int array [tokens, moe_layers, top_k])")
        streams: dict[str, tuple[IO[bytes], tuple[int, ...], np.dtype[Any]]] = {}
        try:
            for key in sorted(names):
                streams[key] = _npy_stream(zf, names[key], path)
            _, shape, dtype = streams["experts"]
            if len(shape) != 3 or dtype.kind not in "iu":
                raise TraceError(
                    path,
                    "experts",
                    f"expected an int array [tokens, moe_layers, top_k], got {dtype} {list(shape)}",
                )
            if "weights" in streams:
                _, ws, wd = streams["weights"]
                if ws != shape or wd.kind != "f":
                    raise TraceError(
                        path,
                        "weights",
                        f"expected floats shaped like experts {list(shape)}, got {wd} {list(ws)}",
                    )
            if "step" in streams:
                _, ss, sd = streams["step"]
                if ss != shape[:1] or sd.kind not in "iu":
                    raise TraceError(
                        path, "step", f"expected ints [tokens] = [{shape[0]}], got {sd} {list(ss)}"
                    )
            done = 0
            while done < shape[0]:
                n = min(CHUNK_TOKENS, shape[0] - done)
                arrays: dict[str, np.ndarray] = {}
                for key, (f, shp, dt) in streams.items():
                    row = int(np.prod(shp[1:], dtype=np.int64)) if len(shp) > 1 else 1
                    want = n * row * dt.itemsize
                    raw = f.read(want)
                    if len(raw) != want:
                        raise TraceError(
                            path,
                            key,
                            f"ends early (at token {done + len(raw) // max(1, row * dt.itemsize)})",
                        )
                    arrays[key] = np.frombuffer(raw, dtype=dt).reshape((n, *shp[1:]))
                yield (
                    Chunk(
                        arrays["experts"].astype(np.int64),
                        arrays["weights"].astype(np.float64) if "weights" in arrays else None,
                        arrays["step"].astype(np.int64) if "step" in arrays else None,
                    ),
                    np.arange(done, done + n, dtype=np.int64),
                )
                done += n
        finally:
            for f, _, _ in streams.values():
                f.close()


def _where(path: str, position: int) -> str:
    return f"token {position}" if _is_npz(path) else f"line {position}"


def _checked(path: str, experts: int | None) -> Iterator[Chunk]:
    """The chunks of a trace, each checked (ids in range and distinct per layer, weights
    finite and >= 0, steps non-decreasing); TraceError at the first bad token."""
    reader = _npz_chunks if _is_npz(path) else _json_chunks
    last_step: int | None = None
    for chunk, pos in reader(path):
        e = chunk.experts
        hi = experts if experts is not None else np.iinfo(np.int32).max
        bad = ((e < 0) | (e >= hi)).any(axis=(1, 2))
        if bad.any():
            i = int(np.argmax(bad))
            _t, layer, slot = np.argwhere((e[i : i + 1] < 0) | (e[i : i + 1] >= hi))[0]
            value = int(e[i, layer, slot])
            limit = f"[0, {experts})" if experts is not None else ">= 0"
            raise TraceError(
                path,
                _where(path, int(pos[i])),
                f"experts[{layer}][{slot}]: expert id {value} outside {limit}"
                + (" (the model's experts)" if experts is not None else ""),
            )
        if e.shape[2] > 1:
            s = np.sort(e, axis=2)
            dup = (np.diff(s, axis=2) == 0).any(axis=2)
            if dup.any():
                i, layer = (int(v) for v in np.argwhere(dup)[0])
                raise TraceError(
                    path,
                    _where(path, int(pos[i])),
                    f"experts[{layer}]: an expert listed twice ({e[i, layer].tolist()})",
                )
        if chunk.weights is not None:
            w = chunk.weights
            badw = (~np.isfinite(w) | (w < 0)).any(axis=(1, 2))
            if badw.any():
                i = int(np.argmax(badw))
                layer, slot = np.argwhere(~np.isfinite(w[i]) | (w[i] < 0))[0]
                raise TraceError(
                    path,
                    _where(path, int(pos[i])),
                    f"weights[{layer}][{slot}]: must be a finite number >= 0",
                )
        if chunk.step is not None:
            st = chunk.step if last_step is None else np.concatenate([[last_step], chunk.step])
            dec = np.diff(st) < 0
            if dec.any():
                at = int(np.argmax(dec)) + 1  # index in ``st`` of the step that went back
                i = at - (0 if last_step is None else 1)
                raise TraceError(
                    path,
                    _where(path, int(pos[i])),
                    f"step: {int(st[at])} after {int(st[at - 1])}: steps must not decrease",
                )
            last_step = int(chunk.step[-1])
        yield chunk


@dataclass(frozen=True)
class TraceInfo:
    """What one full pass over a trace found."""

    path: str
    tokens: int
    moe_layers: int
    top_k: int
    experts: int
    """One more than the largest expert id (or the model's experts when checked against it)."""
    counts: np.ndarray
    """int64 [moe_layers, experts]: how often each expert was chosen at each MoE layer."""
    has_weights: bool
    steps: int
    """Distinct steps recorded (0 without ``step``)."""

    def popularity(self) -> np.ndarray:
        """Each MoE layer's measured popularity (rows sum to 1)."""
        c = self.counts.astype(float)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)


def trace_info(path: str, experts: int | None = None) -> TraceInfo:
    """Scan a whole trace once (chunk by chunk) and check it; ``experts`` bounds the ids.
    Cached by path, size and modification time."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TraceError(path, "", f"cannot read: {exc.strerror or 'error'}") from None
    return _scan(path, st.st_size, st.st_mtime_ns, experts)


@lru_cache(maxsize=16)
def _scan(path: str, size: int, mtime_ns: int, experts: int | None) -> TraceInfo:
    counts: np.ndarray | None = None
    tokens = 0
    shape = (0, 0)
    weights = False
    steps = 0
    last: int | None = None
    for c in _checked(path, experts):
        n, layers, k = c.experts.shape
        shape = (layers, k)
        width = experts if experts is not None else int(c.experts.max()) + 1
        if counts is None:
            counts = np.zeros((layers, width), dtype=np.int64)
        elif counts.shape[1] < width:
            counts = np.pad(counts, ((0, 0), (0, width - counts.shape[1])))
        flat = (c.experts + (np.arange(layers) * counts.shape[1])[None, :, None]).ravel()
        counts += np.bincount(flat, minlength=counts.size).reshape(counts.shape)
        tokens += n
        weights = c.weights is not None
        if c.step is not None:
            steps += int((np.diff(c.step) != 0).sum()) + int(last is None or c.step[0] != last)
            last = int(c.step[-1])
    if counts is None or tokens == 0:
        raise TraceError(path, "", "holds no tokens")
    return TraceInfo(path, tokens, shape[0], shape[1], counts.shape[1], counts, weights, steps)


def model_problems(info: TraceInfo, experts: int, top_k: int, moe_layers: int) -> list[str]:
    """How a trace disagrees with the model (empty when it matches)."""
    first = "token 0" if _is_npz(info.path) else "line 1"
    out = []
    if info.moe_layers != moe_layers:
        out.append(
            f"{first}: experts: {info.moe_layers} MoE layers per token, the model has "
            f"{moe_layers} MoE layers"
        )
    if info.top_k != top_k:
        out.append(
            f"{first}: experts[0]: {info.top_k} experts per token and layer, the model's "
            f"top_k is {top_k}"
        )
    return out


class TraceCursor:
    """Consecutive tokens of a trace in order; at the end it starts again from the first
    token (``passes`` counts the restarts). Memory: one chunk plus what is asked for."""

    def __init__(self, path: str, experts: int | None = None) -> None:
        self.path = path
        self.experts = experts
        self.consumed = 0
        """Tokens handed out so far."""
        self.passes = 0
        """Times the trace was started again from its first token."""
        self._chunks: Iterator[Chunk] = _checked(path, experts)
        self._chunk: Chunk | None = None
        self._at = 0

    def _next_chunk(self) -> Chunk:
        for _ in range(2):
            c = next(self._chunks, None)
            if c is not None:
                return c
            self.passes += 1
            self._chunks = _checked(self.path, self.experts)
        raise TraceError(self.path, "", "holds no tokens")

    def take(self, n: int) -> Chunk:
        """The next ``n`` tokens (cycling at the end of the trace)."""
        parts: list[Chunk] = []
        need = n
        while need > 0:
            if self._chunk is None or self._at >= len(self._chunk.experts):
                self._chunk, self._at = self._next_chunk(), 0
            c, a = self._chunk, self._at
            b = min(len(c.experts), a + need)
            parts.append(
                Chunk(
                    c.experts[a:b],
                    None if c.weights is None else c.weights[a:b],
                    None if c.step is None else c.step[a:b],
                )
            )
            need -= b - a
            self._at = b
        self.consumed += n
        if not parts:
            return Chunk(np.zeros((0, 0, 0), dtype=np.int64), None, None)
        return Chunk(
            np.concatenate([p.experts for p in parts]),
            None if parts[0].weights is None else np.concatenate([p.weights for p in parts]),
            None if parts[0].step is None else np.concatenate([p.step for p in parts]),
        )
