"""Composing images at manifest level: embed one image under a path of another, stack
images the way layers stack. No blob is read, copied or written: the result references
exactly blobs its parts reference, so a host that has the parts fetches nothing new.

A composition is a list of parts applied in order, each an image and the path its root
goes to (``IMAGE`` is ``IMAGE:/``). The first part placed at ``/`` is the base and is
taken as it is; every other part is applied over what the parts before it made (the
"lower" tree), path by path:

- its root becomes the directory at its path, and the parents of that path are created
  when missing;
- a directory over a directory takes the new metadata and keeps what lower parts put in
  it; anything else over the same kind of thing (file, symlink, device, hardlink name)
  replaces it;
- OCI whiteouts delete lower paths: ``DIR/.wh.NAME`` removes ``NAME`` (and everything
  below it), ``DIR/.wh..wh..opq`` everything lower parts put in ``DIR``. They apply to
  lower parts only (the part's own paths stay) and are not copied. A whiteout must be an
  empty regular file with no other name; one that matches nothing is reported, not an
  error (as in OCI). Whiteouts in the base are ordinary files: nothing is below it.
- directories a part does not describe (a parent missing from its manifest, the parents of
  its path) keep what lower parts have; where lower parts have nothing they are created
  as the part would show them mounted alone: 0755, root, the part root's times.

Conflicts are errors (``ComposeError``), never a silent choice:

- a directory where lower parts have anything else, or anything else where they have a
  directory (white the path out in the same part to replace it on purpose);
- a part that replaces or deletes a regular file that hardlinks of lower parts still name
  (the hardlinks would lose their file). With ``relink=True`` the file stays under the
  lowest remaining name instead, as overlayfs shows it, and the others link to that.

Hardlinks of an embedded image are re-targeted to the new paths; adding one prefix to
every name of a group keeps their canonical order, so the target stays the lowest name.
Entries are copied as they are (modes, owners, times, xattrs, chunk lists). The output
version is the highest of the parts' versions. ``format.encode`` writes the result
canonically (same parts, same bytes) and ``format.decode`` validates it like any manifest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ocixfs import safefs
from ocixfs.errors import OcixError, UsageError
from ocixfs.image.format import (
    Chunk,
    Entry,
    Kind,
    Manifest,
    check_path,
    decode,
    encode,
    manifest_digest,
    path_sort_key,
)
from ocixfs.store.layout import blob_path

__all__ = [
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "ComposeError",
    "Composition",
    "Part",
    "PartReport",
    "check_output",
    "compose",
    "missing_blobs",
    "parse_part",
    "write_atomically",
]

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
IMPLICIT_DIR_MODE = 0o755

_KIND_NAMES = {
    Kind.REGULAR: "regular file",
    Kind.DIRECTORY: "directory",
    Kind.SYMLINK: "symlink",
    Kind.HARDLINK: "hardlink",
    Kind.CHARACTER: "character device",
    Kind.BLOCK: "block device",
    Kind.FIFO: "fifo",
}


class ComposeError(OcixError):
    """The parts cannot be composed (a conflict between them, a malformed whiteout)."""


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a composition: ``image`` (a file or an http(s) URL, as given) placed
    with its root at ``at``."""

    image: str
    at: str = "/"

    def __str__(self) -> str:
        return self.image if self.at == "/" else f"{self.image}:{self.at}"


def parse_part(text: str) -> Part:
    """``IMAGE`` or ``IMAGE:/PATH``. The path is what follows the last ``:/`` unless that
    is a URL's ``://`` (so ``http://host:8080/a.ocix:/srv/app`` works); an image whose
    name contains ``:/`` is named as ``NAME:/`` (placed at the root)."""
    index = text.rfind(":/")
    if index > 0 and not text.startswith("//", index + 1):
        image, at = text[:index], text[index + 1:]
        if len(at) > 1 and at.endswith("/"):
            at = at.rstrip("/") or "/"
        try:
            check_path(at)
        except OcixError:
            raise UsageError(f"{text}: {at!r} is not a canonical absolute path") from None
        return Part(image, at)
    if not text:
        raise UsageError("an empty part name")
    return Part(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class PartReport:
    """What applying one part did. ``image``: the part's name for messages (a URL's
    credentials removed). ``added``: paths new in the result (created parents
    included); ``replaced``: lower paths it gave a new entry; ``deleted``: lower paths its
    whiteouts removed (each path below a removed directory counts); ``created``: parent
    directories made for it; ``unmatched_whiteouts``: paths its whiteouts named that lower
    parts did not have; ``relinked``: hardlink groups re-targeted (``relink``)."""

    image: str
    at: str
    digest: str
    version: int
    entries: int
    added: int = 0
    replaced: int = 0
    deleted: int = 0
    created: tuple[str, ...] = ()
    unmatched_whiteouts: tuple[str, ...] = ()
    relinked: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image, "at": self.at, "digest": self.digest,
            "version": self.version, "entries": self.entries, "added": self.added,
            "replaced": self.replaced, "deleted": self.deleted, "created": list(self.created),
            "unmatched_whiteouts": list(self.unmatched_whiteouts), "relinked": self.relinked,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Composition:
    """The composed image: its manifest, canonical bytes and their digest, and per part
    what it did. ``blobs``/``blob_bytes`` count the distinct blobs referenced."""

    manifest: Manifest
    data: bytes
    digest: str
    parts: tuple[PartReport, ...]
    blobs: int
    blob_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest, "version": self.manifest.version,
            "entries": len(self.manifest.entries), "bytes": len(self.data),
            "blobs": self.blobs, "blob_bytes": self.blob_bytes,
            "parts": [report.to_json() for report in self.parts],
        }


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A part with its manifest; ``name`` is how messages call it."""

    part: Part
    name: str
    digest: str
    manifest: Manifest


def compose(
    parts: Sequence[tuple[Part, str, str, Manifest]], *, relink: bool = False
) -> Composition:
    """Compose ``parts``, each ``(part, name for messages and reports, manifest digest,
    manifest)``, in order. Raises ``ComposeError`` on a conflict and ``FormatError`` if the result
    breaks a format rule or limit (a path grown too long by embedding)."""
    if not parts:
        raise UsageError("nothing to compose: give at least one part")
    composer = _Composer(relink=relink)
    reports = [
        composer.apply(_Loaded(part, name, digest, manifest), first=index == 0)
        for index, (part, name, digest, manifest) in enumerate(parts)
    ]
    manifest = Manifest(composer.version, composer.entries)
    data = encode(manifest)
    manifest = decode(data, source="composed manifest")
    blobs = _blob_sizes(manifest.entries.values())
    return Composition(manifest=manifest, data=data, digest=manifest_digest(data),
                       parts=tuple(reports), blobs=len(blobs), blob_bytes=sum(blobs.values()))


def _blob_sizes(entries: Iterable[Entry]) -> dict[bytes, int]:
    return {chunk.digest: chunk.size for entry in entries if entry.kind is Kind.REGULAR
            for chunk in entry.blobs}


def _ancestors(path: str) -> Iterator[str]:
    """The strict ancestors of a canonical path, nearest first, ``/`` last."""
    while path != "/":
        path = path[: path.rindex("/")] or "/"
        yield path


def _relocate(path: str, at: str) -> str:
    if at == "/":
        return path
    return at if path == "/" else at + path


def _name(path: str) -> str:
    return path[path.rindex("/") + 1:]


def _parent(path: str) -> str:
    return path[: path.rindex("/")] or "/"


def _implicit_directory(root: Entry | None) -> Entry:
    """What ``tree`` shows for a directory a manifest leaves out: 0755, root, the root
    entry's times."""
    times = root or Entry(Kind.DIRECTORY)
    return Entry(Kind.DIRECTORY, mode=IMPLICIT_DIR_MODE, atime=times.atime, ctime=times.ctime,
                 mtime=times.mtime)


class _Composer:
    def __init__(self, *, relink: bool) -> None:
        self.relink = relink
        self.entries: dict[str, Entry] = {}
        self.origin: dict[str, str] = {}  # explicit path → name of the part that put it there
        self.version = 0

    def apply(self, loaded: _Loaded, *, first: bool) -> PartReport:
        manifest, at = loaded.manifest, loaded.part.at
        self.version = max(self.version, manifest.version)
        report = PartReport(image=loaded.name, at=at, digest=loaded.digest,
                            version=manifest.version, entries=len(manifest.entries))
        if first and at == "/":
            self.entries = dict(manifest.entries)
            self.origin = dict.fromkeys(self.entries, loaded.name)
            return dataclasses.replace(report, added=len(self.entries))
        return self._merge(loaded, report)

    # ---- one part over the lower tree -------------------------------------------------

    def _merge(self, loaded: _Loaded, report: PartReport) -> PartReport:
        at, name = loaded.part.at, loaded.name
        where = name if at == "/" else f"{name} (at {at})"
        upper, deletes, opaque = self._split(loaded.manifest, at, where)
        lower = self.entries
        kept, deleted, matched = self._delete(lower, deletes, opaque)
        unmatched = tuple(sorted((p for p in deletes if p not in matched), key=path_sort_key))
        lower_dirs = _directories(kept)
        implicit = _implicit_directory(loaded.manifest.entries.get("/"))
        parents = set(_ancestors(at))
        needed = {at, *parents}
        for path in upper:
            needed.update(_ancestors(path))
        for victim in (*deletes, *opaque):
            needed.update(_ancestors(victim))
        needed.update(opaque)
        entries = dict(kept)
        origin = {path: self.origin[path] for path in kept}
        from_part: set[str] = set()
        added = replaced = 0
        created = []
        for path in sorted(needed.union(upper), key=path_sort_key):
            new = upper.get(path)
            before = kept.get(path)
            exists = before is not None or path in lower_dirs
            was_dir = path in lower_dirs
            # A part can white out what is below its PATH, not PATH or what is above it.
            advice = "" if path == at or path in parents else (
                " (white it out in the same part to replace it)")
            if new is None or new.kind is Kind.DIRECTORY:
                if exists and not was_dir:
                    assert before is not None
                    raise ComposeError(
                        f"{path}: {where} needs a directory here, but "
                        f"{_holder(origin, path)} a {_KIND_NAMES[before.kind]}{advice}"
                    )
            elif exists and was_dir:
                raise ComposeError(
                    f"{path}: {where} has a {_KIND_NAMES[new.kind]} here, but "
                    f"{_holder(origin, path)} a directory{advice}"
                )
            if new is None:
                if not exists:
                    entries[path] = implicit
                    origin[path] = name
                    added += 1
                    if path in parents:
                        created.append(path)
                continue
            entries[path] = new
            origin[path] = name
            from_part.add(path)
            if exists:
                replaced += 1
            else:
                added += 1
        relinked = self._check_links(lower, kept, entries, from_part, where, origin)
        self.entries, self.origin = entries, origin
        return dataclasses.replace(
            report, added=added, replaced=replaced, deleted=deleted, created=tuple(created),
            unmatched_whiteouts=unmatched, relinked=relinked,
        )

    @staticmethod
    def _split(
        manifest: Manifest, at: str, where: str
    ) -> tuple[dict[str, Entry], set[str], set[str]]:
        """The part's entries at their new paths (whiteouts left out), the lower paths its
        whiteouts delete, and the directories its opaque whiteouts empty."""
        upper: dict[str, Entry] = {}
        deletes: set[str] = set()
        opaque: set[str] = set()
        whiteouts: set[str] = set()
        for path, entry in manifest.entries.items():
            name = _name(path)
            if "/" + WHITEOUT_PREFIX in _parent(path):
                raise ComposeError(f"{path}: in {where}: a whiteout cannot have entries below it")
            if not name.startswith(WHITEOUT_PREFIX):
                if entry.kind is Kind.HARDLINK:
                    assert entry.target is not None
                    entry = dataclasses.replace(entry, target=_relocate(entry.target, at))
                upper[_relocate(path, at)] = entry
                continue
            if entry.kind is not Kind.REGULAR or entry.size != 0:
                raise ComposeError(f"{path}: in {where}: a whiteout must be an empty regular "
                                   f"file, not a {'non-empty ' if entry.size else ''}"
                                   f"{_KIND_NAMES[entry.kind]}")
            whiteouts.add(path)
            directory = _relocate(_parent(path), at)
            if name == OPAQUE_WHITEOUT:
                opaque.add(directory)
                continue
            victim = name[len(WHITEOUT_PREFIX):]
            if victim in ("", ".", ".."):
                raise ComposeError(f"{path}: in {where}: a malformed whiteout")
            deletes.add(directory + "/" + victim if directory != "/" else "/" + victim)
        for path, entry in manifest.entries.items():
            if entry.kind is Kind.HARDLINK and entry.target in whiteouts:
                raise ComposeError(f"{path}: in {where}: a hardlink to the whiteout "
                                   f"{entry.target}")
        return upper, deletes, opaque

    @staticmethod
    def _delete(
        lower: Mapping[str, Entry], deletes: set[str], opaque: set[str]
    ) -> tuple[dict[str, Entry], int, set[str]]:
        """``lower`` without what the whiteouts remove; the count, and which deletes
        matched something."""
        if not deletes and not opaque:
            return dict(lower), 0, set()
        kept: dict[str, Entry] = {}
        matched: set[str] = set()
        deleted = 0
        for path, entry in lower.items():
            hit = path in deletes
            if hit:
                matched.add(path)
            for ancestor in _ancestors(path):
                if ancestor in deletes:
                    matched.add(ancestor)
                    hit = True
                elif ancestor in opaque:
                    hit = True
            if hit:
                deleted += 1
            else:
                kept[path] = entry
        return kept, deleted, matched

    def _check_links(
        self,
        lower: Mapping[str, Entry],
        kept: Mapping[str, Entry],
        entries: dict[str, Entry],
        from_part: set[str],
        where: str,
        origin: Mapping[str, str],
    ) -> int:
        """Lower hardlinks whose file this part replaced or deleted: an error, or with
        ``relink`` the file moves to the lowest remaining name. Returns the groups moved."""
        broken: dict[str, list[str]] = {}
        for path, entry in entries.items():
            if entry.kind is Kind.HARDLINK and path not in from_part:
                target = entry.target
                assert target is not None
                if target in from_part or target not in kept:
                    broken.setdefault(target, []).append(path)
        for target in sorted(broken, key=path_sort_key):
            names = sorted(broken[target], key=path_sort_key)
            if not self.relink:
                what = "replaces" if target in from_part else "deletes"
                others = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
                raise ComposeError(
                    f"{target}: {where} {what} a file that lower hardlinks still name "
                    f"({others}); replace or "
                    "delete those names too, or pass --relink to keep the file under "
                    f"{names[0]}"
                )
            entries[names[0]] = lower[target]
            for name in names[1:]:
                entries[name] = Entry(Kind.HARDLINK, target=names[0])
        return len(broken)


def _holder(origin: Mapping[str, str], path: str) -> str:
    """Who put ``path`` in the lower tree, for messages: ``"NAME has"``."""
    name = origin.get(path)
    return "lower parts have" if name is None else f"{name} has"


def _directories(entries: Mapping[str, Entry]) -> set[str]:
    """Every directory of a tree: explicit ones, implicit parents and the root."""
    found = {"/"}
    for path, entry in entries.items():
        if entry.kind is Kind.DIRECTORY:
            found.add(path)
        for ancestor in _ancestors(path):
            if ancestor in found:
                break
            found.add(ancestor)
    return found


# ---- the store and the output -------------------------------------------------------------


def missing_blobs(manifest: Manifest, store: Path) -> list[Chunk]:
    """The blobs ``manifest`` references that ``store`` (a local directory) lacks or holds
    with the wrong size, in digest order."""
    missing = []
    for digest, size in sorted(_blob_sizes(manifest.entries.values()).items()):
        try:
            if os.stat(blob_path(store, digest)).st_size == size:
                continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UsageError(f"--store {store}: {exc.strerror}") from None
        missing.append(Chunk(size, digest))
    return missing


def check_output(path: Path) -> None:
    """Refuse, before any work, an output that is not a plain file name in an existing
    directory: a directory, a symlink (writing would go elsewhere or replace the link)."""
    if not path.name or path.name in (".", ".."):
        raise UsageError(f"{path}: not a file name")
    if path.is_symlink():
        raise UsageError(f"{path}: is a symlink; name the file itself")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: {path.parent} is not a directory")


def write_atomically(path: Path, data: bytes) -> None:
    """Write the composed manifest to ``path`` (``check_output`` first) through
    ``safefs.write_atomically``: readers see the old file or the new one, and a failure
    leaves no partial file behind. Raises ``UsageError``."""
    check_output(path)
    try:
        safefs.write_atomically(path, data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
