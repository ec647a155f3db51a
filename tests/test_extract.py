"""``ocixfs extract``: real images built by ``ocixfs build``, real stores (a directory and
a real HTTP server), real files compared with the source tree."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocixfs.cache.blobs import Cache
from ocixfs.cli import main
from ocixfs.errors import UsageError
from ocixfs.image.format import Kind
from ocixfs.image.loading import load_image
from ocixfs.image.tree import Tree
from ocixfs.progress import Progress
from ocixfs.store.layout import blob_path
from ocixfs.store.spec import parse_stores
from ocixfs.tools.extract import ExtractOptions, _BlobGone, _Plan, check_destination, extract_image
from tests.faultserver import FaultServer
from tests.imagetools import CAP_NET_RAW, MTIME, make_rootfs
from tests.treecompare import differences, walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and device nodes need root")


@pytest.fixture(autouse=True)
def fresh_log_handler() -> Iterator[None]:
    """``main()`` binds its stderr log handler once per process; drop it after each test so
    the next test's captured stderr gets a handler of its own."""
    logger = logging.getLogger("ocixfs")
    saved = logger.handlers[:]
    yield
    logger.handlers[:] = saved

MiB = 1 << 20


def rich_rootfs(root: Path) -> Path:
    """imagetools' rootfs plus what extraction gets wrong most easily."""
    make_rootfs(root)
    su = root / "usr" / "bin" / "su"
    su.write_bytes(b"\x7fELF su")
    os.chown(su, 0, 42)
    os.chmod(su, 0o6755)  # after chown, which clears setuid/setgid
    os.setxattr(su, "security.capability", CAP_NET_RAW)
    locked = root / "usr" / "locked"  # a read-only directory with content below it
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "data").write_bytes(b"deep\n")
    os.chmod(locked / "inner", 0o500)
    os.chmod(locked, 0o555)
    zeros = root / "zeros.bin"  # repeats one chunk blob several times in a file
    zeros.write_bytes(bytes(2 * MiB + MiB // 2))
    (root / "copy-of-zeros.bin").write_bytes(bytes(2 * MiB + MiB // 2))
    os.mknod(root / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.symlink("/nonexistent/target", root / "dangling")
    os.utime(root / "dangling", ns=(MTIME * 10**9, MTIME * 10**9 + 5), follow_symlinks=False)
    for directory in (root / "usr", root / "etc", root):  # distinct directory times
        os.utime(directory, ns=(MTIME * 10**9, MTIME * 10**9 + 7))
    return root


def build(tmp_path: Path, root: Path, *args: str) -> Path:
    store, image = tmp_path / "store", tmp_path / f"{root.name}.ocix"
    assert main(["build", f"dir:{root}", "--store", str(store), "-o", str(image),
                 "--no-progress", *args]) == 0
    return image


def extract(capsys: pytest.CaptureFixture[str], image: Path, dest: Path, store: str,
            cache: Path, *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["extract", str(image), str(dest), "--store", store,
                 "--cache-dir", str(cache), "--no-progress", "--json", *args]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


def assert_same_times(image: Path, dest: Path) -> None:
    """Every name's mtime and atime (directories included) is the manifest's."""
    tree = Tree.from_manifest(load_image(str(image)).manifest)
    found = walk(dest)
    for path, st in found.items():
        node = tree.node_by_path(path)
        assert node is not None, path
        assert st.st_mtime_ns == node.mtime_ns, path
        if not stat.S_ISLNK(st.st_mode):  # walking follows symlinks, which bumps their atime
            assert st.st_atime_ns == node.atime_ns, path


@pytest.mark.parametrize("version", ["0", "1"])
def test_extract_equals_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               version: str) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root, "--format-version", version)
    dest = tmp_path / "out" / "tree"  # parents are created too
    summary = extract(capsys, image, dest, str(tmp_path / "store"), tmp_path / "cache")
    assert_same_times(image, dest)  # before anything reads the files (atime)
    assert differences(root, dest, check_xattrs=version == "1") == []
    su = dest / "usr" / "bin" / "su"
    if version == "1":
        assert os.getxattr(su, "security.capability") == CAP_NET_RAW
    else:  # v0 has no xattrs: none may appear
        assert os.listxattr(su, follow_symlinks=False) == []
    assert stat.S_IMODE(os.lstat(su).st_mode) == 0o6755
    assert summary["files"] == 9 and summary["hardlinks"] == 2
    assert (summary["devices"], summary["fifos"], summary["symlinks"]) == (2, 1, 2)
    assert summary["skipped"] == {}
    assert summary["fetched_blobs"] == summary["blobs"] and summary["cached_blobs"] == 0
    assert summary["bytes"] == sum(
        st.st_size for st in {s.st_ino: s for s in walk(root).values()
                              if stat.S_ISREG(s.st_mode)}.values()
    )


def test_extract_over_http_reuses_the_cache(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root, "--compress", "zstd")
    cache = tmp_path / "cache"
    with FaultServer(tmp_path / "store") as server:
        first = extract(capsys, image, tmp_path / "one", server.url, cache, "--jobs", "3")
        blob_requests = server.count("*") - server.count("ocix-store.json")
        assert blob_requests == first["blobs"] == first["fetched_blobs"]
        assert first["fetched_bytes"] == first["blob_bytes"]
        assert 0 < first["received_bytes"] < first["blob_bytes"]  # zstd went over
        server.reset_counts()
        second = extract(capsys, image, tmp_path / "two", server.url, cache)
        assert server.count("*") - server.count("ocix-store.json") == 0
    assert second["fetched_blobs"] == 0 and second["fetched_bytes"] == 0
    assert second["cached_blobs"] == first["blobs"]
    assert second["cached_bytes"] == first["blob_bytes"]
    assert differences(root, tmp_path / "one") == []
    assert differences(root, tmp_path / "two") == []


def test_missing_blob_fails_in_one_line(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root)
    hostname = Tree.from_manifest(load_image(str(image)).manifest).node_by_path("/etc/hostname")
    assert hostname is not None
    for packed in (False, True):
        blob_path(tmp_path / "store", hostname.blobs[0].digest, zstd=packed).unlink()
    dest = tmp_path / "out"
    capsys.readouterr()
    status = main(["extract", str(image), str(dest), "--store", str(tmp_path / "store"),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("ocixfs: blob ")
    assert hostname.blobs[0].hex in err and f"({dest} is incomplete)" in err
    assert not (dest / "etc" / "hostname").exists()
    assert not [p for p in os.listdir(dest) if p.startswith(".ocixfs-extract-")]
    for path, st in walk(dest).items():  # whatever was written is complete
        if stat.S_ISREG(st.st_mode):
            assert (dest / path[1:]).read_bytes() == (root / path[1:]).read_bytes(), path


def test_destination_must_be_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    capsys.readouterr()
    assert main(["extract", str(image), str(tmp_path / "full"),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (
        f"ocixfs: {tmp_path / 'full'}: not empty (extract needs an empty or new directory)\n"
    )
    with pytest.raises(UsageError, match="not a directory"):
        check_destination(tmp_path / "full" / "x")
    check_destination(tmp_path / "absent")


def test_store_beside_the_image_and_text_summary(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "rootfs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "file").write_bytes(b"hello\n")
    store = tmp_path / "store"
    store.mkdir()
    assert main(["build", f"dir:{root}", "--store", str(store), "-o", str(store / "i.ocix"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["extract", str(store / "i.ocix"), str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "entries     3  (2 directories, 1 files)" in out
    assert "fetched     1 blobs, 6 B" in out and "from cache  0 blobs, 0 B" in out
    assert (tmp_path / "out" / "a" / "file").read_bytes() == b"hello\n"


def test_without_owners_skips_and_counts(tmp_path: Path) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = load_image(str(build(tmp_path, root)))
    stores = parse_stores([(tmp_path / "store").as_uri()])
    summary = extract_image(image, tmp_path / "out", stores=stores, cache_dir=tmp_path / "cache",
                            options=ExtractOptions(same_owner=False, progress=False))
    tree = Tree.from_manifest(image.manifest)
    foreign = [n for n in tree.iter_nodes() if (n.uid, n.gid) != (0, 0)]
    assert summary.skipped == {"owners": len(foreign)} and len(foreign) == 3
    assert os.lstat(tmp_path / "out" / "home" / "user").st_uid == 0
    su = tmp_path / "out" / "usr" / "bin" / "su"
    assert stat.S_IMODE(os.lstat(su).st_mode) == 0o6755
    assert os.getxattr(su, "security.capability") == CAP_NET_RAW
    kinds = {n.kind for n in tree.iter_nodes()}
    assert Kind.BLOCK in kinds and (tmp_path / "out" / "loop0").is_block_device()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_capabilities_skips_devices_and_owners(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Root without CAP_MKNOD and CAP_CHOWN (a restricted container): the rest still works."""
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root)
    dest = tmp_path / "out"
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-mknod,-chown", sys.executable, "-m", "ocixfs",
         "extract", str(image), str(dest), "--store", str(tmp_path / "store"),
         "--cache-dir", str(tmp_path / "cache"), "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == {"devices": 2, "owners": 3}
    warnings = result.stderr.splitlines()
    assert sum("device node" in line for line in warnings) == 1, result.stderr
    assert sum("owner" in line for line in warnings) == 1, result.stderr  # one per kind
    problems = differences(root, dest)
    assert {p.split(":")[0] for p in problems} == {"paths only in source", "paths only in mount",
                                                   "/home/user", "/home/user/notes", "/usr/bin/su"}
    assert not (dest / "null").exists() and not (dest / "loop0").exists()
    su = dest / "usr" / "bin" / "su"
    assert stat.S_IMODE(os.lstat(su).st_mode) == 0o6755
    assert os.getxattr(su, "security.capability") == CAP_NET_RAW


def test_a_blob_missing_from_the_cache_stops_a_batch_cleanly(tmp_path: Path) -> None:
    """The writer's side of eviction by another process: files before the missing blob are
    written, the one that needs it leaves no temporary file, and the caller learns where to
    resume (``extract`` then fetches the blob again)."""
    root = tmp_path / "rootfs"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(name.encode() * 10)
    image = load_image(str(build(tmp_path, root)))
    cache = Cache(tmp_path / "cache")
    plan = _Plan(Tree.from_manifest(image.manifest), tmp_path / "out", same_owner=True)
    (tmp_path / "out").mkdir()
    plan.create_skeleton()
    batch = [(node, links) for node, links in plan.files]
    for node, _ in batch[:1] + batch[2:]:  # the cache holds a and c, not b
        shutil.copy(blob_path(tmp_path / "store", node.blobs[0].digest),
                    cache.path_of(node.blobs[0]))
    with pytest.raises(_BlobGone) as caught:
        plan.write_files(batch, cache, Progress("x", enabled=False))
    assert caught.value.done == 1 and caught.value.chunk == batch[1][0].blobs[0]
    assert (tmp_path / "out" / "a").read_bytes() == b"a" * 10
    assert not (tmp_path / "out" / "b").exists() and os.listdir(plan.stage) == []


def test_no_devices_and_no_setuid_leave_them_out(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = rich_rootfs(tmp_path / "rootfs")
    image = build(tmp_path, root)
    tree = Tree.from_manifest(load_image(str(image)).manifest)
    devices = [n.path for n in tree.iter_nodes() if n.kind in (Kind.CHARACTER, Kind.BLOCK)]
    set_id = [n.path for n in tree.iter_nodes()
              if n.kind is Kind.REGULAR and n.mode & (stat.S_ISUID | stat.S_ISGID)]
    assert devices and set_id  # the sample tree has both
    summary = extract(capsys, image, tmp_path / "out", str(tmp_path / "store"),
                      tmp_path / "cache", "--no-devices", "--no-setuid")
    for path in devices:
        assert not os.path.lexists(tmp_path / "out" / path[1:])
    for path in set_id:
        mode = os.lstat(tmp_path / "out" / path[1:]).st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID)
    assert summary["skipped"]["devices"] == len(devices)
    assert summary["skipped"]["setuid"] == len(set_id)
