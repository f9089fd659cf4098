"""Reading the files a scenario names (includes, device profiles, serving traces, Hugging Face
``config.json``): regular files only, size-capped, read against a deadline, and only from
the places a :class:`PathPolicy` allows.

The default policy: a path written in a scenario file must lie in the folder of the
scenario named on the command line (or below it); a path given with ``--set`` may also lie
under the working directory; ``--allow-path DIR`` (or ``load_scenario(allow_paths=...)``)
adds folders. Symlinks are followed before the check, so a link cannot lead outside.
Errors name the path as written and why, never the file's contents.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from moesim.errors import Issue, Location, ScenarioError

KIB = 1024
MIB = 1024 * KIB
MAX_YAML_BYTES = 4 * MIB
"""Scenario, include, sweep and profile files (the largest shipped one is under 40 KiB)."""
MAX_JSON_BYTES = 4 * MIB
"""A Hugging Face ``config.json`` (published ones are a few KiB)."""
MAX_TRACE_BYTES = 64 * MIB
"""A serving trace CSV (about two million requests)."""
READ_DEADLINE_S = 30.0
"""A file that takes longer than this to read (a stalled network mount) is an error."""


@dataclass(frozen=True)
class PathPolicy:
    """Where input files may be read from. ``roots is None``: anywhere (the Python API
    with plain data)."""

    roots: tuple[FsPath, ...] | None = ()
    set_roots: tuple[FsPath, ...] = field(default_factory=tuple)
    """Further folders for paths given with ``--set`` (the working directory)."""

    @staticmethod
    def for_scenario(scenario_file: str | FsPath, allow: Iterable[str | FsPath] = ()) -> PathPolicy:
        top = FsPath(os.path.realpath(FsPath(scenario_file).parent))
        extra = tuple(FsPath(os.path.realpath(a)) for a in allow)
        return PathPolicy((top, *extra), (FsPath(os.path.realpath(FsPath.cwd())),))

    @staticmethod
    def anywhere() -> PathPolicy:
        return PathPolicy(None)

    def problem(self, target: FsPath, from_set: bool) -> str | None:
        """Why ``target`` may not be read (None when it may)."""
        if self.roots is None:
            return None
        real = FsPath(os.path.realpath(target))
        roots = (*self.roots, *self.set_roots) if from_set else self.roots
        for root in roots:
            if real == root or root in real.parents:
                return None
        where = ", ".join(str(r) for r in self.roots[:1]) or "the scenario's folder"
        return (
            f"{str(target)!r} is outside the scenario's folder ({where}); files may be read "
            "only from there unless allowed: moesim ... --allow-path DIR"
        )


def read_input(
    target: FsPath,
    limit: int,
    loc: Location,
    field_path: str,
    policy: PathPolicy | None = None,
    from_set: bool = False,
) -> bytes:
    """The bytes of one input file, or a located ScenarioError saying why not (outside the
    allowed folders, missing, not a regular file, over ``limit`` bytes, too slow)."""

    def fail(why: str) -> ScenarioError:
        return ScenarioError([Issue(loc, field_path, why)])

    if policy is not None:
        why = policy.problem(target, from_set)
        if why:
            raise fail(why)
    shown = repr(str(target))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise fail(f"cannot read file {shown}: a loop of symbolic links") from None
        raise fail(f"cannot read file {shown}: {exc.strerror or 'error'}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise fail(f"cannot read file {shown}: {kind} (only regular files are read)")
        if info.st_size > limit:
            raise fail(_too_big(shown, limit))
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        deadline = time.monotonic() + READ_DEADLINE_S
        while True:
            chunk = os.read(fd, MIB)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise fail(_too_big(shown, limit))
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise fail(f"cannot read file {shown}: took over {READ_DEADLINE_S:g} s")
        return b"".join(chunks)
    except OSError as exc:
        raise fail(f"cannot read file {shown}: {exc.strerror or 'error'}") from None
    finally:
        os.close(fd)


def _too_big(shown: str, limit: int) -> str:
    return (
        f"{shown} is larger than {limit // MIB} MiB, the most moesim reads for this kind of "
        "file (a bound that keeps a wrong path from filling memory)"
    )
