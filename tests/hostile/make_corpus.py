"""Write the corpus of hostile OCIX manifests in this directory (``python -m
tests.hostile.make_corpus``); ``tests/test_hostile.py`` checks the committed files are what
this script writes, then feeds each one to the decoder, ``ocixfs inspect`` and
``ocixfs mount``.

The CBOR is written by hand, byte by byte (``head``, ``text``, ``cmap`` ... below), not
with an encoder that could refuse or repair what we want to say. Each case is a valid
baseline manifest with one thing wrong, so the refusal it must produce is known:
``cases.json`` maps each file name to ``{"why": ..., "expect": <substring of the error>}``.
``baseline.ocix`` is the valid manifest itself (``expect`` is null): it proves the hand
encoder writes what the decoder accepts.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["CASES", "build_cases", "cmap", "head", "manifest", "text", "write_corpus"]

OCIX_TAG = 1868786040
HASH = bytes(range(32))
HERE = Path(__file__).parent

# --- the hand encoder ----------------------------------------------------------------------


def head(major: int, value: int, *, width: int | None = None) -> bytes:
    """A CBOR head: shortest form unless ``width`` (0, 1, 2, 4, 8 argument bytes) is given."""
    if width is None:
        width = next(w for w, limit in ((0, 24), (1, 256), (2, 65536), (4, 1 << 32), (8, 1 << 64))
                     if value < limit)
    if width == 0:
        return bytes([major << 5 | value])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + value.to_bytes(width, "big")


def uint(value: int) -> bytes:
    return head(0, value)


def negative(value: int) -> bytes:
    return head(1, -1 - value)


def bstr(data: bytes) -> bytes:
    return head(2, len(data)) + data


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return head(3, len(raw)) + raw


def array(*items: bytes) -> bytes:
    return head(4, len(items)) + b"".join(items)


def raw_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A map with its pairs in exactly this order (duplicates and disorder allowed)."""
    return head(5, len(pairs)) + b"".join(k + v for k, v in pairs)


def cmap(pairs: dict[str, bytes] | list[tuple[str, bytes]]) -> bytes:
    """A map with text keys in canonical order (length first, then bytewise)."""
    items = list(pairs.items()) if isinstance(pairs, dict) else pairs
    encoded = sorted(((text(k), v) for k, v in items), key=lambda kv: (len(kv[0]), kv[0]))
    return raw_map(encoded)


def tag(number: int, item: bytes) -> bytes:
    return head(6, number) + item


TRUE, FALSE = b"\xf5", b"\xf4"


def mode(bits: int = 0o644) -> bytes:
    def rwx(shift: int) -> bytes:
        return array(*(TRUE if bits >> (shift + s) & 1 else FALSE for s in (2, 1, 0)))

    return array(rwx(6), rwx(3), rwx(0), *(TRUE if bits & b else FALSE
                                             for b in (0o4000, 0o2000, 0o1000)))


def regular(size: int = 5, digest: bytes = HASH, **more: bytes) -> bytes:
    return cmap({"mode": mode(), "type": text("regularfile"),
                 "regularfile": array(uint(size), bstr(digest)), **more})


def directory(**more: bytes) -> bytes:
    return cmap({"mode": mode(0o755), "type": text("directory"), "directory": array(), **more})


def symlink(target: str | bytes = "target") -> bytes:
    return cmap({"mode": mode(0o777), "type": text("symlink"), "symlink": array(text(target))})


def link(target: str) -> bytes:
    return cmap({"type": text("link"), "link": array(text(target))})


def manifest(files: bytes | dict[str, bytes], version: int = 1) -> bytes:
    body = files if isinstance(files, bytes) else cmap(files)
    return tag(OCIX_TAG, cmap({"files": body, "version": uint(version)}))


def baseline_files() -> dict[str, bytes]:
    return {
        "/": directory(),
        "/etc": directory(),
        "/etc/hostname": regular(),
        "/bin": symlink("usr/bin"),
        "/usr/bin/tool": regular(10),
        "/usr/bin/tool2": link("/usr/bin/tool"),
    }


def with_files(**changes: bytes) -> bytes:
    """The baseline with paths replaced or added (keyword names use _ for /)."""
    files = baseline_files()
    for key, value in changes.items():
        files[key] = value
    return manifest(files)


def files_with(entries: dict[str, bytes], version: int = 1) -> bytes:
    return manifest({"/": directory(), **entries}, version)


def chunked(size: int, *chunks: bytes, digest: bytes = HASH) -> bytes:
    return cmap({"mode": mode(), "type": text("regularfile"),
                 "regularfile": array(uint(size), bstr(digest), array(*chunks))})


def chunk(size: int, digest: bytes = HASH) -> bytes:
    return array(uint(size), bstr(digest))


def nested_arrays(depth: int) -> bytes:
    return b"\x81" * depth + b"\x80"


def nested_maps(depth: int) -> bytes:
    return (b"\xa1" + text("a")) * depth + b"\xa0"


def float64(value: float) -> bytes:
    return b"\xfb" + struct.pack(">d", value)


# --- the cases -------------------------------------------------------------------------------

Case = tuple[str, Callable[[], bytes], str | None]


def _cases() -> list[Case]:
    base = manifest(baseline_files())
    return [
        # the valid starting point of every case
        ("baseline", lambda: base, None),
        # not CBOR, or not an OCIX manifest
        ("empty", lambda: b"", "unexpected end of data"),
        ("not-cbor", lambda: b"I am not a manifest\n", "not an OCIX manifest"),
        ("json", lambda: b'{"version": 1, "files": {}}', "not an OCIX manifest"),
        ("no-tag", lambda: cmap({"files": cmap({}), "version": uint(1)}),
         "not an OCIX manifest"),
        ("wrong-tag", lambda: tag(55799, base[5:]), "not an OCIX manifest"),
        ("top-not-a-map", lambda: tag(OCIX_TAG, array(uint(1))), "not a map"),
        ("truncated-half", lambda: base[: len(base) // 2], "unexpected end of data"),
        ("truncated-in-a-head", lambda: base[:5] + b"\xbb\x00\x00", "unexpected end of data"),
        ("trailing-bytes", lambda: base + b"\x00", "1 bytes after the manifest"),
        ("two-manifests", lambda: base + base, "bytes after the manifest"),
        # declared lengths far beyond the data
        ("huge-bstr-length", lambda: with_files(**{"/etc/hostname": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), head(2, 1 << 60) + HASH)})}),
         "unexpected end of data"),
        ("huge-text-length", lambda: manifest(raw_map([(head(3, 1 << 62) + b"/x", directory())])),
         "unexpected end of data"),
        ("huge-array-length", lambda: with_files(**{"/etc/hostname": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), bstr(HASH), head(4, 1 << 40) + chunk(5))})}),
         "chunks exceed the limit"),
        ("huge-map-length", lambda: with_files(
            **{"/usr/bin/tool2": head(5, 1 << 50) + link("/usr/bin/tool")[1:]}),
         "unexpected end of data"),
        ("files-claims-10-million", lambda: manifest(
            head(5, 10_000_000) + text("/") + directory()),
         "10000000 entries exceed the limit"),
        ("unknown-key-huge-length", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": head(2, (1 << 64) - 1)})}),
         "unexpected end of data"),
        # indefinite lengths (never canonical)
        ("indefinite-files-map", lambda: manifest(
            b"\xbf" + text("/") + directory() + b"\xff"), "indefinite-length item"),
        ("indefinite-path", lambda: manifest(
            b"\xa1\x7f" + text("/e") + text("tc") + b"\xff" + directory()),
         "indefinite-length item"),
        ("indefinite-hash", lambda: with_files(**{"/etc/hostname": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), b"\x5f" + bstr(HASH[:16]) + bstr(HASH[16:]) + b"\xff")
        })}), "indefinite-length item"),
        ("indefinite-chunk-list", lambda: files_with({"/f": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), bstr(HASH), b"\x9f" + chunk(5) + b"\xff")})}),
         "indefinite-length item"),
        ("lone-break", lambda: with_files(**{"/etc": b"\xff"}), "malformed CBOR"),
        ("reserved-additional-info", lambda: with_files(**{"/etc": b"\x1c"}), "malformed CBOR"),
        # tags other than the OCIX tag and time tags 0/1
        ("bignum-size", lambda: with_files(**{"/etc/hostname": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(tag(2, bstr(b"\x05")), bstr(HASH))})}),
         "file size is not an unsigned integer"),
        ("tag-on-path", lambda: manifest(raw_map([(tag(32, text("/x")), directory())])),
         "map key is not text"),
        ("shareable-entry", lambda: with_files(**{"/etc": tag(28, directory())}),
         "entry is not a map"),
        ("shared-reference", lambda: with_files(**{"/etc": tag(29, uint(0))}),
         "entry is not a map"),
        ("tag-in-unknown-key", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": tag(55799, uint(1))})}), "tag 55799 is not allowed here"),
        ("tag-0-on-mode", lambda: with_files(**{"/etc": cmap({
            "mode": tag(0, mode(0o755)), "type": text("directory"), "directory": array()})}),
         "mode is not"),
        ("tag-1-holding-text", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "mtime": tag(1, text("2024-01-01T00:00:00Z"))})}), "does not hold a number"),
        ("tag-1-nan", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "mtime": tag(1, b"\xf9\x7e\x00")})}), "not a finite number"),
        # non-canonical encodings
        ("uint-not-shortest", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "uid": head(0, 5, width=2)})}), "not in shortest form"),
        ("length-not-shortest", lambda: manifest(raw_map([
            (text("/"), directory()), (head(3, 4, width=1) + b"/etc", directory())])),
         "not in shortest form"),
        ("entry-keys-out-of-order", lambda: with_files(**{"/etc": raw_map([
            (text("type"), text("directory")), (text("mode"), mode(0o755)),
            (text("directory"), array())])}), "map keys not in canonical order"),
        ("paths-out-of-order", lambda: manifest(raw_map([
            (text("/b"), directory()), (text("/a"), directory())])),
         "map keys not in canonical order"),
        ("paths-sorted-bytewise-not-by-length", lambda: manifest(raw_map([
            (text("/aa"), directory()), (text("/b"), directory())])),
         "map keys not in canonical order"),
        ("top-keys-out-of-order", lambda: tag(OCIX_TAG, raw_map([
            (text("version"), uint(1)), (text("files"), cmap({"/": directory()}))])),
         "map keys not in canonical order"),
        ("float-not-shortest", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": float64(1.5)})}), "float not in shortest form"),
        ("nan-not-canonical", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": float64(float("nan"))})}), "NaN not encoded as f97e00"),
        ("simple-value-not-shortest", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": b"\xf8\x10"})}), "two-byte simple value"),
        # duplicates
        ("duplicate-path", lambda: manifest(raw_map([
            (text("/"), directory()), (text("/a"), directory()), (text("/a"), regular())])),
         "duplicate map key"),
        ("duplicate-entry-key", lambda: with_files(**{"/etc": raw_map([
            (text("mode"), mode(0o755)), (text("mode"), mode(0o777)),
            (text("type"), text("directory")), (text("directory"), array())])}),
         "duplicate map key"),
        ("duplicate-top-key", lambda: tag(OCIX_TAG, raw_map([
            (text("files"), cmap({"/": directory()})), (text("files"), cmap({})),
            (text("version"), uint(1))])), "duplicate map key"),
        ("duplicate-xattr", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "xattrs": raw_map([(text("user.a"), bstr(b"1")), (text("user.a"), bstr(b"2"))])})}),
         "duplicate map key"),
        # text that is not UTF-8
        ("path-not-utf8", lambda: manifest(raw_map([
            (text("/"), directory()), (text(b"/\xff\xfe"), directory())])), "not valid UTF-8"),
        ("path-with-surrogate", lambda: manifest(raw_map([
            (text("/"), directory()), (text(b"/\xed\xa0\x80"), directory())])),
         "not valid UTF-8"),
        ("unknown-key-not-utf8", lambda: with_files(**{"/etc": raw_map([
            (text(b"zz\xff"), uint(0)), (text("mode"), mode(0o755)),
            (text("type"), text("directory")), (text("directory"), array())])}),
         "not valid UTF-8"),
        # nesting
        ("deep-nested-arrays", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": nested_arrays(100_000)})}), "nested deeper than"),
        ("deep-nested-maps", lambda: with_files(**{"/etc": cmap({
            "mode": mode(0o755), "type": text("directory"), "directory": array(),
            "zzzzz": nested_maps(20_000)})}), "nested deeper than"),
        # the top level
        ("version-missing", lambda: tag(OCIX_TAG, cmap({"files": cmap({"/": directory()})})),
         "no 'version'"),
        ("files-missing", lambda: tag(OCIX_TAG, cmap({"version": uint(1)})), "no 'files' map"),
        ("files-not-a-map", lambda: tag(OCIX_TAG, cmap({
            "files": array(text("/")), "version": uint(1)})), "'files' is not a map"),
        ("version-2", lambda: manifest(baseline_files(), version=2), "unsupported version 2"),
        ("version-huge", lambda: tag(OCIX_TAG, cmap({
            "files": cmap({"/": directory()}), "version": uint((1 << 64) - 1)})),
         "unsupported version"),
        ("version-negative", lambda: tag(OCIX_TAG, cmap({
            "files": cmap({"/": directory()}), "version": negative(-1)})),
         "version is not an unsigned integer"),
        # paths
        ("path-dotdot-escape", lambda: with_files(**{"/../etc/passwd": regular()}),
         "not a canonical absolute path"),
        ("path-dotdot-inside", lambda: with_files(**{"/usr/../etc/shadow": regular()}),
         "not a canonical absolute path"),
        ("path-dotdot-last", lambda: with_files(**{"/etc/..": directory()}),
         "not a canonical absolute path"),
        ("path-dot", lambda: with_files(**{"/./etc": directory()}),
         "not a canonical absolute path"),
        ("path-relative", lambda: with_files(**{"etc/passwd": regular()}),
         "not a canonical absolute path"),
        ("path-empty", lambda: with_files(**{"": directory()}), "not a canonical absolute path"),
        ("path-empty-component", lambda: with_files(**{"/etc//passwd": regular()}),
         "not a canonical absolute path"),
        ("path-trailing-slash", lambda: with_files(**{"/var/": directory()}),
         "not a canonical absolute path"),
        ("path-nul", lambda: with_files(**{"/etc/pass\0wd": regular()}),
         "not a canonical absolute path"),
        ("path-nul-name", lambda: with_files(**{"/\0": regular()}),
         "not a canonical absolute path"),
        ("slash-inside-a-file-name", lambda: with_files(**{"/etc/hostname/x": regular()}),
         "is a regularfile, not a directory"),
        ("path-through-a-symlink", lambda: with_files(**{"/bin/sh": regular()}),
         "is a symlink, not a directory"),
        ("name-too-long", lambda: with_files(**{"/" + "n" * 256: regular()}),
         "a name longer than 255 bytes"),
        ("path-too-long", lambda: with_files(**{("/" + "p" * 200) * 21: regular()}),
         "path longer than 4096 bytes"),
        ("root-is-a-file", lambda: with_files(**{"/": regular()}), "the root is a regularfile"),
        ("root-is-a-symlink", lambda: with_files(**{"/": symlink("/")}),
         "the root is a symlink"),
        # hardlinks
        ("hardlink-cycle", lambda: files_with({"/a": link("/b"), "/b": link("/a")}),
         "is not a regular file"),
        ("hardlink-to-itself", lambda: files_with({"/a": link("/a")}), "is not a regular file"),
        ("hardlink-to-directory", lambda: files_with({"/d": directory(), "/l": link("/d")}),
         "is not a regular file"),
        ("hardlink-to-symlink", lambda: files_with({"/a": symlink(), "/b": link("/a")}),
         "is not a regular file"),
        ("hardlink-to-missing", lambda: files_with({"/l": link("/nowhere")}),
         "does not exist"),
        ("hardlink-chain", lambda: files_with({"/a": regular(), "/b": link("/a"),
                                               "/c": link("/b")}), "is not a regular file"),
        ("hardlink-not-lowest-name", lambda: files_with({"/a": link("/b"), "/b": regular()}),
         "must be the file's lowest name"),
        ("hardlink-with-metadata", lambda: files_with({"/a": regular(), "/b": cmap({
            "mode": mode(), "type": text("link"), "link": array(text("/a"))})}),
         "a hardlink carries no metadata"),
        ("hardlink-relative-target", lambda: files_with({"/a": regular(), "/b": link("a")}),
         "not a canonical absolute path"),
        ("hardlink-dotdot-target", lambda: files_with({"/a": regular(), "/bb": link("/x/../a")}),
         "not a canonical absolute path"),
        # sizes, chunks, hashes
        ("size-2-64", lambda: files_with({"/f": regular((1 << 64) - 1)}), "file size"),
        ("size-2-63", lambda: files_with({"/f": regular(1 << 63)}), "file size"),
        ("size-over-limit", lambda: files_with({"/f": regular((1 << 50) + 1)}), "file size"),
        ("size-negative", lambda: files_with({"/f": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(negative(-5), bstr(HASH))})}),
         "file size is not an unsigned integer"),
        ("size-without-hash", lambda: files_with({"/f": cmap({
            "mode": mode(), "type": text("regularfile"), "regularfile": array(uint(5))})}),
         "no b3-256 hash"),
        ("chunks-do-not-add-up", lambda: files_with(
            {"/f": chunked(10, chunk(4), chunk(4))}), "chunk sizes add up to 8, not"),
        ("chunks-overflow", lambda: files_with(
            {"/f": chunked(10, chunk((1 << 64) - 1), chunk((1 << 64) - 1))}),
         "chunk sizes add up to"),
        ("chunk-of-size-zero", lambda: files_with({"/f": chunked(5, chunk(5), chunk(0))}),
         "a chunk is not [size > 0"),
        ("chunk-list-empty", lambda: files_with({"/f": chunked(5)}),
         "chunk list is empty"),
        ("chunks-in-version-0", lambda: files_with(
            {"/f": chunked(10, chunk(5), chunk(5))}, version=0), "chunk lists need version 1"),
        ("chunk-hash-16-bytes", lambda: files_with(
            {"/f": chunked(10, chunk(5), chunk(5, HASH[:16]))}), "a chunk is not [size > 0"),
        ("chunk-not-a-pair", lambda: files_with(
            {"/f": chunked(5, array(uint(5), bstr(HASH), uint(0)))}), "chunk is not"),
        ("hash-31-bytes", lambda: files_with({"/f": regular(5, HASH[:31])}),
         "b3-256 hash is 31 bytes"),
        ("hash-33-bytes", lambda: files_with({"/f": regular(5, HASH + b"!")}),
         "b3-256 hash is 33 bytes"),
        ("hash-256-bytes", lambda: files_with({"/f": regular(5, HASH * 8)}),
         "b3-256 hash is 256 bytes"),
        ("hash-empty", lambda: files_with({"/f": regular(5, b"")}), "b3-256 hash is 0 bytes"),
        ("hash-as-text", lambda: files_with({"/f": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), text(HASH.hex()))})}), "is not a byte string"),
        ("regularfile-four-items", lambda: files_with({"/f": cmap({
            "mode": mode(), "type": text("regularfile"),
            "regularfile": array(uint(5), bstr(HASH), array(chunk(5)), uint(0))})}),
         "regularfile is not"),
        # entry shapes and fields
        ("entry-not-a-map", lambda: files_with({"/f": array(uint(1))}), "entry is not a map"),
        ("unknown-type", lambda: files_with({"/s": cmap({
            "mode": mode(), "type": text("socket"), "socket": array()})}),
         "unknown type 'socket'"),
        ("type-and-content-disagree", lambda: files_with({"/d": cmap({
            "mode": mode(), "type": text("directory"),
            "regularfile": array(uint(5), bstr(HASH))})}), "does not match type directory"),
        ("two-content-keys", lambda: files_with({"/d": cmap({
            "mode": mode(), "type": text("directory"), "directory": array(),
            "fifo": array()})}), "two content keys"),
        ("no-type", lambda: files_with({"/d": cmap({"mode": mode(), "directory": array()})}),
         "no 'type'"),
        ("no-content", lambda: files_with({"/d": cmap({"mode": mode(),
                                                       "type": text("directory")})}),
         "without its 'directory' content"),
        ("no-mode", lambda: files_with({"/d": cmap({"type": text("directory"),
                                                    "directory": array()})}), "no mode"),
        ("mode-as-integer", lambda: files_with({"/d": cmap({
            "mode": uint(0o755), "type": text("directory"), "directory": array()})}),
         "mode is not"),
        ("mode-short", lambda: files_with({"/d": cmap({
            "mode": array(array(TRUE, TRUE, TRUE)), "type": text("directory"),
            "directory": array()})}), "mode is not"),
        ("device-major-huge", lambda: files_with({"/dev": cmap({
            "mode": mode(), "type": text("character"),
            "character": array(uint(1 << 32), uint(3))})}), "device"),
        ("device-minor-negative", lambda: files_with({"/dev": cmap({
            "mode": mode(), "type": text("block"), "block": array(uint(1), negative(-1))})}),
         "device minor is not an unsigned integer"),
        ("uid-too-big", lambda: files_with({"/d": directory(uid=uint(1 << 40))}),
         "is not an unsigned 32-bit integer"),
        ("gid-negative", lambda: files_with({"/d": directory(gid=negative(-1))}),
         "gid is not an unsigned integer"),
        ("username-too-long", lambda: files_with({"/d": directory(username=text("u" * 300))}),
         "username is not text of at most 255 bytes"),
        ("symlink-empty-target", lambda: files_with({"/l": symlink("")}),
         "symlink target is empty"),
        ("symlink-target-with-nul", lambda: files_with({"/l": symlink("/etc\0passwd")}),
         "contains NUL"),
        ("symlink-target-too-long", lambda: files_with({"/l": symlink("t" * 5000)}),
         "symlink target longer than"),
        ("symlink-target-not-text", lambda: files_with({"/l": cmap({
            "mode": mode(), "type": text("symlink"), "symlink": array(bstr(b"x"))})}),
         "symlink target is not text"),
        ("time-impossible-date", lambda: files_with(
            {"/d": directory(mtime=text("2024-02-30T00:00:00Z"))}), "is not a valid date"),
        ("time-not-rfc3339", lambda: files_with({"/d": directory(mtime=text("yesterday"))}),
         "is not RFC 3339 time"),
        ("time-year-10000", lambda: files_with({"/d": directory(mtime=tag(1, uint(1 << 40)))}),
         "within the years 0001-9999"),
        ("xattrs-in-version-0", lambda: files_with({"/d": directory(
            xattrs=cmap({"user.a": bstr(b"1")}))}, version=0), "xattrs need version 1"),
        ("xattrs-empty", lambda: files_with({"/d": directory(xattrs=cmap({}))}),
         "xattrs is empty"),
        ("xattr-name-empty", lambda: files_with({"/d": directory(
            xattrs=cmap({"": bstr(b"1")}))}), "xattr name"),
        ("xattr-value-text", lambda: files_with({"/d": directory(
            xattrs=cmap({"user.a": text("1")}))}), "is not a byte string"),
        ("xattrs-too-large", lambda: files_with({"/d": directory(
            xattrs=cmap({f"user.{i}": bstr(b"v" * 4000) for i in range(20)}))}),
         "over the limit of"),
    ]


CASES = _cases()


def build_cases() -> dict[str, tuple[bytes, dict[str, str | None]]]:
    """name → (file bytes, {"why", "expect"})."""
    out = {}
    for name, make, expect in CASES:
        out[name] = (make(), {"why": name.replace("-", " "), "expect": expect})
    return out


def write_corpus(directory: Path = HERE) -> list[Path]:
    """Write every case as ``NAME.ocix`` plus ``cases.json``; return the files written."""
    written = []
    index = {}
    for name, (data, info) in build_cases().items():
        path = directory / f"{name}.ocix"
        path.write_bytes(data)
        written.append(path)
        index[f"{name}.ocix"] = info
    (directory / "cases.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return [*written, directory / "cases.json"]


if __name__ == "__main__":
    files = write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"wrote {len(files)} files")
