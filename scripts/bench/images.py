"""Benchmark images: Debian root filesystems, as OCI layouts, casync and OCIX stores.

Every artefact is cached under the work directory and rebuilt only when its inputs change:

    WORK/images/NAME/
        spec.json          what the image was built from (variant, packages, apt sources hash)
        oci/               the OCI image layout, tag "bench" (umoci; one gzip layer)
        ref/rootfs/        the layout unpacked by umoci: the reference tree every other
                           artefact is made from, and where the lower bound is measured
        casync/            NAME.caidx + NAME.castr/ (casync make of ref/rootfs)
        ocix/KEY/          NAME.ocix + store/ (ocixfs build of the layout; KEY hashes the
                           ocixfs sources, so a changed builder rebuilds), and with a
                           compressed store NAME.ocix.gz for nginx's gzip_static
        lower-bound.json   the files the workload opens (strace) and their bytes

Root file systems come from ``mmdebstrap`` reading this host's configured apt sources (the
source files are passed through as they are; no mirror is named here).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "IMAGES",
    "NEXT_VERSIONS",
    "ImageSpec",
    "LowerBound",
    "Workload",
    "apt_sources",
    "build_casync",
    "build_ocix",
    "build_oci",
    "chroot_env",
    "host_suite",
    "measure_lower_bound",
    "tree_size",
]

OCI_TAG = "bench"
BUILD_TIMEOUT = 3600.0
WORKLOAD_TIMEOUT = 600.0
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """A container start: a command run in a chroot of the image; stdout is discarded."""

    name: str
    argv: tuple[str, ...]

    def describe(self) -> str:
        return " ".join(self.argv)


PYTHON_START = Workload(
    name="python-import", argv=("python3", "-c", "import json, email, http.client")
)
# `>/dev/null` happens outside the chroot (the harness discards stdout): lazy mounts are
# nodev, where the image's own /dev/null cannot be opened.
DPKG_LIST = Workload(name="dpkg-list", argv=("sh", "-c", "dpkg -l"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageSpec:
    name: str
    variant: str
    include: tuple[str, ...]
    workload: Workload
    min_bytes: int = 0  # unpacked size the image must reach (the "large" one)
    customize: tuple[str, ...] = ()  # mmdebstrap --customize-hook commands ($1: the rootfs)

    def key(self, suite: str, sources_digest: str) -> dict[str, object]:
        return {
            "variant": self.variant,
            "include": list(self.include),
            **({"customize": list(self.customize)} if self.customize else {}),
            "suite": suite,
            "sources": sources_digest,
        }


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec(name="minbase", variant="minbase", include=(), workload=DPKG_LIST),
        ImageSpec(name="python", variant="minbase", include=("python3",), workload=PYTHON_START),
        ImageSpec(
            name="large",
            variant="minbase",
            include=("python3", "python3-dev", "build-essential", "perl", "git"),
            workload=PYTHON_START,
            min_bytes=450 * 10**6,
        ),
    )
}


# Version N+1 of an image, for a host that ran only version N (the ``ocixfs-borrowed``
# contender): the root file system rebuilt by mmdebstrap with one small package added and
# python3.11 "upgraded" the way an upgrade changes it for a start-up: every .py of its
# standard library touched (to a whole second: tar keeps no fraction, and a .pyc records
# its source's mtime in seconds) and its bytecode rebuilt, so every .pyc the workload reads
# has new content (the paths stay). Without the second part nothing the workload reads would
# change and version N's cache alone would serve the start.
UPGRADE_PYTHON = ('chroot "$1" sh -c \'find /usr/lib/python3.11 -name "*.py" '
                  '-exec touch -d @1767225600 {} + '
                  '&& python3 -m compileall -q -f /usr/lib/python3.11 >/dev/null; true\'')
NEXT_VERSIONS: dict[str, ImageSpec] = {
    name: dataclasses.replace(spec, name=f"{name}-next", include=(*spec.include, "python3-six"),
                              customize=(UPGRADE_PYTHON,))
    for name, spec in IMAGES.items()
    if name != "minbase"
}


def _run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log: Path | None = None,
    timeout: float = BUILD_TIMEOUT,
) -> None:
    """Run a build step; on failure raise with the tail of its output."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            [os.fspath(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        out.seek(0)
        text = out.read()
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(os.fspath(a) for a in argv)}\n{text}\n")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{os.fspath(argv[0])} failed (exit {proc.returncode}):\n{tail}")


# -- apt sources and the host suite ----------------------------------------------------------


def apt_sources() -> list[Path]:
    """This host's apt source files (one-line .list and deb822 .sources), in apt's order."""
    files: list[Path] = []
    main = Path("/etc/apt/sources.list")
    if main.is_file() and any(
        line.strip() and not line.lstrip().startswith("#") for line in main.read_text().splitlines()
    ):
        files.append(main)
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    if not files:
        raise RuntimeError("no apt sources configured on this host")
    return files


def host_suite() -> str:
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    suite = fields.get("VERSION_CODENAME", "").strip('"')
    if not suite:
        raise RuntimeError("cannot tell this host's Debian suite (no VERSION_CODENAME)")
    return suite


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p) + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# -- OCI layout ------------------------------------------------------------------------------


def tree_size(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under root, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return len(seen), total


def build_oci(
    spec: ImageSpec, image_dir: Path, scratch: Path, *, rebuild: bool = False
) -> dict[str, object]:
    """Ensure image_dir/oci (the layout) and image_dir/ref/rootfs exist for spec.

    mmdebstrap's tree is made under scratch (a file system where deleting is cheap).
    """
    sources = apt_sources()
    suite = host_suite()
    key = spec.key(suite, _digest(sources))
    spec_file = image_dir / "spec.json"
    ready = (image_dir / "oci" / "index.json").is_file() and (image_dir / "ref" / "rootfs").is_dir()
    if not rebuild and ready and spec_file.is_file():
        info: dict[str, object] = json.loads(spec_file.read_text())
        if info.get("key") == key:
            return info
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)
    log = image_dir / "build.log"
    rootfs = scratch / f"mmdebstrap-{spec.name}"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    argv: list[str | os.PathLike[str]] = [
        "mmdebstrap",
        f"--variant={spec.variant}",
        "--mode=root",
        "--format=directory",
    ]
    if spec.include:
        argv.append("--include=" + ",".join(spec.include))
    argv += [f"--customize-hook={hook}" for hook in spec.customize]
    argv += [suite, rootfs, *sources]
    _run(argv, log=log)
    layout = image_dir / "oci"
    _run(["umoci", "init", "--layout", layout], log=log)
    _run(["umoci", "new", "--image", f"{layout}:{OCI_TAG}"], log=log)
    _run(["umoci", "insert", "--image", f"{layout}:{OCI_TAG}", rootfs, "/"], log=log)
    shutil.rmtree(rootfs)
    _run(["umoci", "unpack", "--image", f"{layout}:{OCI_TAG}", image_dir / "ref"], log=log)
    files, size = tree_size(image_dir / "ref" / "rootfs")
    if size < spec.min_bytes:
        raise RuntimeError(
            f"image {spec.name}: {size / 1e6:.0f} MB unpacked, wanted >= {spec.min_bytes / 1e6:.0f}"
        )
    info = {
        "key": key,
        "unpacked_files": files,
        "unpacked_bytes": size,
        "oci_blob_bytes": sum(
            p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file()
        ),
    }
    spec_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- casync ----------------------------------------------------------------------------------


def build_casync(spec: ImageSpec, image_dir: Path) -> tuple[Path, Path]:
    """Ensure a casync index + chunk store of ref/rootfs; return (caidx, castr)."""
    out = image_dir / "casync"
    caidx = out / f"{spec.name}.caidx"
    castr = out / f"{spec.name}.castr"
    if caidx.is_file() and castr.is_dir():
        return caidx, castr
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    partial = out / f"partial-{spec.name}.caidx"  # casync insists on the suffix
    _run(
        ["casync", "make", f"--store={castr}", partial, image_dir / "ref" / "rootfs"],
        log=image_dir / "build.log",
    )
    partial.rename(caidx)
    return caidx, castr


# -- OCIX ------------------------------------------------------------------------------------


def ocixfs_source_key(repo: Path) -> str:
    """A hash of the ocixfs package sources: a changed builder means a rebuilt image."""
    return _digest(sorted((repo / "ocixfs").rglob("*.py")))


def build_ocix(
    spec: ImageSpec, image_dir: Path, ocixfs: Path, repo: Path, *, compress: str | None
) -> tuple[Path, Path]:
    """Ensure an OCIX manifest + blob store built from the OCI layout; return (image, store)."""
    key = ocixfs_source_key(repo) + (f"-{compress}" if compress else "")
    out = image_dir / "ocix" / key
    image = out / f"{spec.name}.ocix"
    store = out / "store"
    if image.is_file() and store.is_dir():
        _gzip_beside(image, compress)
        return image, store
    if (image_dir / "ocix").exists():
        shutil.rmtree(image_dir / "ocix")  # older builds: keep one
    out.mkdir(parents=True)
    argv: list[str | os.PathLike[str]] = [
        ocixfs,
        "build",
        f"oci:{image_dir / 'oci'}:{OCI_TAG}",
        "--store",
        store,
        "--output",
        out / "partial.ocix",
        "--no-progress",
    ]
    argv += ["--compress", compress or "none"]
    _run(argv, log=image_dir / "build.log")
    (out / "partial.ocix").rename(image)
    _gzip_beside(image, compress)
    return image, store


def _gzip_beside(image: Path, compress: str | None) -> None:
    """With a compressed store, serve the manifest compressed too: NAME.ocix.gz beside it,
    which nginx's ``gzip_static`` sends to clients that accept gzip (ocixfs does)."""
    packed = image.with_name(image.name + ".gz")
    if compress and not packed.is_file():
        packed.write_bytes(gzip.compress(image.read_bytes(), compresslevel=9))


# -- lower bound -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowerBound:
    """The regular files a workload opened or executed inside the image, each once."""

    files: int
    bytes: int
    paths: tuple[str, ...]

    def seconds(self, rate_bytes: float) -> float:
        return self.bytes / rate_bytes


def chroot_env() -> dict[str, str]:
    return {"PATH": CHROOT_PATH, "HOME": "/root", "LC_ALL": "C"}


_SYSCALL = re.compile(
    r'^(?P<pid>\d+)\s+(?P<call>openat|execve|chroot)\((?:AT_FDCWD, )?"(?P<path>[^"]*)"'
    r".*\)\s+=\s+(?P<ret>-?\d+)"
)
_UNFINISHED = re.compile(
    r'^(?P<pid>\d+)\s+(?P<call>openat|execve|chroot)\((?:AT_FDCWD, )?"(?P<path>[^"]*)".*'
    r"<unfinished \.\.\.>$"
)
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+<\.\.\. (?P<call>\w+) resumed>.*\)\s+=\s+(?P<ret>-?\d+)")


def _parse_strace(text: str) -> list[tuple[str, str]]:
    """Successful (call, path) pairs made after the chroot.

    Before the chroot only chroot(1) itself runs (on the host's files); every later event,
    from it or from the children it starts, is inside the image.
    """
    chrooted = False
    pending: dict[str, tuple[str, str]] = {}
    events: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _SYSCALL.match(line)
        if m:
            call, path, ret = m["call"], m["path"], int(m["ret"])
        elif (u := _UNFINISHED.match(line)) is not None:
            pending[u["pid"]] = (u["call"], u["path"])
            continue
        elif (r := _RESUMED.match(line)) is not None and r["pid"] in pending:
            call, path = pending.pop(r["pid"])
            ret = int(r["ret"])
        else:
            continue
        if ret < 0:
            continue
        if call == "chroot":
            chrooted = True
        elif chrooted:
            events.append((call, path))
    return events


def _resolve(rootfs: Path, path: str) -> Path | None:
    """Resolve path as the chroot would, symlinks re-rooted at rootfs; None if missing."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def _interpreter(path: Path) -> str | None:
    """The program the kernel also loads to run path: ELF PT_INTERP or a #! line."""
    with path.open("rb") as f:
        head = f.read(64)
        if head.startswith(b"#!"):
            line = (head + f.readline())[2:].split(b"\n", 1)[0].split()
            return os.fsdecode(line[0]) if line else None
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # ELF64 little-endian only
            return None
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return os.fsdecode(f.read(p_filesz).rstrip(b"\0"))
    return None


def measure_lower_bound(spec: ImageSpec, image_dir: Path) -> LowerBound:
    """strace the workload on the reference rootfs; cache the result beside it."""
    cache = image_dir / "lower-bound.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("workload") == list(spec.workload.argv):
            return LowerBound(files=data["files"], bytes=data["bytes"], paths=tuple(data["paths"]))
    rootfs = image_dir / "ref" / "rootfs"
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        proc = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-s",
                "4096",
                "-e",
                "trace=openat,execve,chroot",
                "-o",
                trace,
                "chroot",
                rootfs,
                *spec.workload.argv,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=chroot_env(),
            timeout=WORKLOAD_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"workload failed under strace: {proc.stderr.decode()[-500:]}")
        events = _parse_strace(trace.read_text())
    seen: dict[tuple[int, int], tuple[str, int]] = {}

    def add(path: str) -> Path | None:
        real = _resolve(rootfs, path)
        if real is None:
            return None
        st = os.lstat(real)
        if stat.S_ISREG(st.st_mode):
            seen.setdefault(
                (st.st_dev, st.st_ino), ("/" + str(real.relative_to(rootfs)), st.st_size)
            )
            return real
        return None

    for call, path in events:
        real = add(path)
        if call == "execve" and real is not None and (interp := _interpreter(real)):
            add(interp)
    paths = tuple(p for p, _ in seen.values())
    bound = LowerBound(files=len(seen), bytes=sum(s for _, s in seen.values()), paths=paths)
    cache.write_text(
        json.dumps(
            {
                "workload": list(spec.workload.argv),
                "files": bound.files,
                "bytes": bound.bytes,
                "paths": list(bound.paths),
            },
            indent=1,
        )
        + "\n"
    )
    return bound
