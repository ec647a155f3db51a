"""``ocixfs compose``: images embedded in and stacked over others, at manifest level.

The images are real trees built with ``ocixfs build dir:`` (no mmdebstrap: like the demo
test, the "python" image is this host's python3, its standard library and the shared
libraries they load; "minbase" is ``tests.imagetools.make_rootfs`` plus /bin/sh). The
composed images are mounted with FUSE and programs run from them in a chroot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ocixfs.errors import UsageError
from ocixfs.image.format import Entry, Kind, Manifest, decode, encode
from ocixfs.image.loading import load_image
from ocixfs.tools.compose import ComposeError, Part, compose, parse_part
from tests.imagetools import FileState, make_rootfs, snapshot_dir, snapshot_manifest
from tests.mounting import OCIXFS, Mounts, needs_fuse, run_ocixfs, store_args
from tests.nginx import Nginx

CHROOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "HOME": "/"}
PYTHON = Path("/usr/bin/python3.11")
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "site-packages", "dist-packages", "config-3*", "__pycache__", "pydoc_data")


# ---- real trees and images ----------------------------------------------------------------


def copy_with_libs(binaries: list[Path], root: Path) -> None:
    """Copy the shared libraries ``binaries`` load (per ldd) to the same paths in ``root``."""
    libs: set[str] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", os.fspath(binary)], capture_output=True, text=True).stdout
        libs.update(word for line in out.splitlines() for word in line.split()
                    if word.startswith("/"))
    for lib in libs:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)


def make_minbase(root: Path, hostname: bytes = b"example\n") -> Path:
    """``imagetools.make_rootfs`` (hardlinks, xattrs, devices, a chunked file, /bin ->
    usr/bin) plus a working /bin/sh and a documentation directory."""
    make_rootfs(root)
    (root / "etc" / "hostname").write_bytes(hostname)
    sh = Path(os.path.realpath("/bin/sh"))
    shutil.copy2(sh, root / "usr" / "bin" / "sh")
    copy_with_libs([sh], root)
    doc = root / "usr" / "share" / "doc" / "base"
    doc.mkdir(parents=True)
    (doc / "readme").write_bytes(b"the base\n")
    (doc / "copyright").write_bytes(b"nobody\n")
    return root


def make_python(root: Path) -> Path:
    """This host's python3: the binary (also hard-linked as /usr/bin/py, with an xattr),
    its standard library and every shared library they load."""
    if not PYTHON.is_file():
        pytest.skip(f"{PYTHON} is not installed")
    stdlib = Path("/usr/lib/python3.11")
    (root / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(PYTHON, root / "usr" / "bin" / "python3.11")
    os.symlink("python3.11", root / "usr" / "bin" / "python3")
    os.link(root / "usr" / "bin" / "python3.11", root / "usr" / "bin" / "py")
    os.setxattr(root / "usr" / "bin" / "python3.11", "user.origin", b"host")
    shutil.copytree(stdlib, root / "usr" / "lib" / "python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns(*STDLIB_SKIP))
    copy_with_libs([PYTHON, *(stdlib / "lib-dynload").glob("*.so")], root)
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('PRETTY_NAME="python3 copied from the host"\n')
    return root


class Images(NamedTuple):
    work: Path
    store: Path
    minbase_root: Path
    minbase: Path
    other_base: Path  # minbase with another /etc/hostname
    python_root: Path
    python: Path


def build(source: Path, store: Path, output: Path, *args: str) -> Path:
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(store), "--output",
               os.fspath(output), "--no-progress", *args)
    return output


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("compose")
    store = work / "store"
    minbase_root = make_minbase(work / "minbase")
    other_root = make_minbase(work / "other", hostname=b"another host\n")
    python_root = make_python(work / "python")
    return Images(
        work=work,
        store=store,
        minbase_root=minbase_root,
        minbase=build(minbase_root, store, work / "minbase.ocix"),
        other_base=build(other_root, store, work / "other.ocix"),
        python_root=python_root,
        python=build(python_root, store, work / "python.ocix"),
    )


def compose_cli(
    out: Path, *parts: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_ocixfs("compose", os.fspath(out), *map(os.fspath, parts), check=check)


def store_listing(store: Path) -> dict[str, tuple[int, int]]:
    return {os.fspath(path.relative_to(store)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in store.rglob("*")}


def blob_digests(image: Path) -> set[bytes]:
    return {chunk.digest for entry in load_image(os.fspath(image)).manifest.entries.values()
            if entry.kind is Kind.REGULAR for chunk in entry.blobs}


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [shutil.which("chroot") or "/usr/sbin/chroot", os.fspath(root), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=CHROOT_ENV)


def under(states: dict[str, FileState], prefix: str) -> dict[str, FileState]:
    """The states below ``prefix``, with paths (and hardlink names) made relative to it."""
    def strip(path: str) -> str:
        return path[len(prefix):] or "/"

    return {strip(path): FileState(**{**state.__dict__,
                                      "links": frozenset(map(strip, state.links))})
            for path, state in states.items() if path == prefix or path.startswith(prefix + "/")}


# ---- embed: the python image inside minbase ----------------------------------------------------


@pytest.fixture(scope="module")
def embedded(images: Images) -> Path:
    out = images.work / "app.ocix"
    compose_cli(out, images.minbase, f"{images.python}:/srv/app")
    return out


@needs_fuse
@pytest.mark.mount
def test_embedded_python_runs_in_a_chroot_of_the_mount(
    images: Images, embedded: Path, tmp_path: Path, mounts: Mounts
) -> None:
    args = store_args(os.fspath(images.store), tmp_path / "cache")
    with mounts(embedded, tmp_path / "mnt", *args) as mount:
        app = mount.mountpoint / "srv" / "app"
        script = "import json, email, http.client, sys; print(json.dumps([sys.prefix, 'ok']))"
        result = chroot(app, "python3", "-c", script)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["/usr", "ok"]
        # The hardlink name of the embedded image runs too: its target moved with it.
        linked = chroot(app, "/usr/bin/py", "-c", "print(6 * 7)")
        assert linked.returncode == 0, linked.stderr
        assert linked.stdout == "42\n"
        base = chroot(mount.mountpoint, "/bin/sh", "-c", "read h < /etc/hostname; echo $h")
        assert base.returncode == 0, base.stderr
        assert base.stdout == "example\n"
        # What a user sees: the python tree at /srv/app, the base everywhere else, exactly
        # (modes, owners, contents, symlinks, devices, xattrs, hardlink groups).
        seen = snapshot_dir(mount.mountpoint)
        assert under(seen, "/srv/app") == snapshot_dir(images.python_root)
        rest = {p: s for p, s in seen.items() if p != "/srv" and not p.startswith("/srv/")}
        assert rest == snapshot_dir(images.minbase_root)
        assert seen["/srv"].kind is Kind.DIRECTORY and seen["/srv"].mode == 0o755
        py = os.stat(app / "usr" / "bin" / "py")
        assert py.st_nlink == 2 and py.st_ino == os.stat(app / "usr/bin/python3.11").st_ino
        assert os.getxattr(app / "usr/bin/py", "user.origin") == b"host"


def test_embedding_relocates_entries_and_hardlink_targets(images: Images, embedded: Path) -> None:
    composed = load_image(os.fspath(embedded)).manifest
    base = load_image(os.fspath(images.minbase)).manifest
    python = load_image(os.fspath(images.python)).manifest
    assert composed.version == 1
    for path, entry in python.entries.items():
        moved = composed.entries["/srv/app" if path == "/" else "/srv/app" + path]
        if entry.kind is Kind.HARDLINK:
            assert moved == Entry(Kind.HARDLINK, target="/srv/app" + (entry.target or ""))
        else:
            assert moved == entry
    assert composed.entries["/usr/bin/ping6"] == base.entries["/usr/bin/ping6"]
    assert composed.entries["/srv/app/usr/bin/python3.11"] == Entry(
        Kind.HARDLINK, target="/srv/app/usr/bin/py")
    assert set(composed.entries) == (
        set(base.entries) | {"/srv"} | {"/srv/app" + p if p != "/" else "/srv/app"
                                        for p in python.entries})
    # The created parent looks like a directory the python image would show implicitly.
    assert composed.entries["/srv"] == Entry(
        Kind.DIRECTORY, mode=0o755, atime=python.entries["/"].atime,
        ctime=python.entries["/"].ctime, mtime=python.entries["/"].mtime)
    assert blob_digests(embedded) == blob_digests(images.minbase) | blob_digests(images.python)


def test_same_parts_give_the_same_bytes_and_nothing_is_written_to_the_store(
    images: Images, embedded: Path, tmp_path: Path
) -> None:
    before = store_listing(images.store)
    again = tmp_path / "again.ocix"
    result = compose_cli(again, images.minbase, f"{images.python}:/srv/app", "--store",
                         os.fspath(images.store))
    assert again.read_bytes() == embedded.read_bytes()
    assert "every blob present" in result.stdout
    # One part alone at the root is that image, byte for byte.
    compose_cli(tmp_path / "same.ocix", images.minbase)
    assert (tmp_path / "same.ocix").read_bytes() == images.minbase.read_bytes()
    assert store_listing(images.store) == before
    assert sorted(os.listdir(tmp_path)) == ["again.ocix", "same.ocix"]  # no temp files


def test_diff_of_two_composed_images_fetches_nothing_for_the_embedded_part(
    images: Images, embedded: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-app.ocix"
    compose_cli(other, images.other_base, f"{images.python}:/srv/app")
    result = run_ocixfs("diff", os.fspath(embedded), os.fspath(other), "--json", "--all")
    diff = json.loads(result.stdout)
    changes = [*diff["added"], *diff["removed"], *diff["changed"]]
    assert [(c["status"], c["path"], c["what"]) for c in changes] == [
        ("M", "/etc/hostname", ["content"])]
    assert diff["fetch"] == {"blobs": 1, "bytes": len(b"another host\n")}
    bases = json.loads(run_ocixfs("diff", os.fspath(images.minbase),
                                  os.fspath(images.other_base), "--json").stdout)
    assert diff["fetch"] == bases["fetch"]


def test_dedup_counts_the_embedded_image_once(images: Images, embedded: Path) -> None:
    """What the README says ``ocixfs dedup`` reports for an image inside an image."""
    table = json.loads(run_ocixfs("dedup", os.fspath(images.python), os.fspath(embedded),
                                  os.fspath(images.minbase), "--json").stdout)
    content = table["content"]
    python_bytes, app_bytes, base_bytes = content["per_image"]
    # The composed image is what its parts hold (shared libraries counted once), so it
    # adds nothing to a host that stores them: no byte is unique to any of the three.
    assert content["unique"] == [0, 0, 0]
    assert app_bytes == content["distinct"] < python_bytes + base_bytes
    assert content["shared"] < base_bytes


def test_parts_given_as_urls(images: Images, embedded: Path, tmp_path: Path) -> None:
    with Nginx(images.work, tmp_path / "nginx") as server:
        out = tmp_path / "url.ocix"
        result = compose_cli(out, f"{server.url}minbase.ocix",
                             f"{server.url}python.ocix:/srv/app", "--json")
        assert out.read_bytes() == embedded.read_bytes()
        assert {f"/{name}" for name in ("minbase.ocix", "python.ocix")} <= set(server.requests())
        secret_url = server.url.replace("http://", "http://user:s3cret@")
        refused = compose_cli(tmp_path / "refused.ocix", f"{server.url}minbase.ocix",
                              f"{secret_url}python.ocix:/srv/app", check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert "--store-auth" in refused.stderr and "s3cret" not in refused.stderr
        assert not (tmp_path / "refused.ocix").exists()
        parts = json.loads(result.stdout)["parts"]
        assert [(part["image"], part["at"]) for part in parts] == [
            (f"{server.url}minbase.ocix", "/"), (f"{server.url}python.ocix", "/srv/app")]


# ---- stack: an upper image that adds, replaces and deletes ----------------------------------


def make_upper(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_bytes(b"upper\n")  # replaces
    (root / "etc" / "motd").write_bytes(b"added by the upper image\n")  # adds
    (root / "etc" / ".wh.empty").write_bytes(b"")  # deletes a file
    (root / "home").mkdir()
    (root / "home" / ".wh.user").write_bytes(b"")  # deletes a directory and its contents
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / ".wh.ping6").write_bytes(b"")  # deletes one hardlink name
    doc = root / "usr" / "share" / "doc" / "base"
    doc.mkdir(parents=True)
    (doc / ".wh..wh..opq").write_bytes(b"")  # empties what the base has there ...
    (doc / "readme").write_bytes(b"the upper readme\n")  # ... but keeps its own files
    (root / ".wh.nothing-here").write_bytes(b"")  # matches nothing: reported
    return root


@pytest.fixture(scope="module")
def upper(images: Images) -> Path:
    return build(make_upper(images.work / "upper"), images.store, images.work / "upper.ocix",
                 "--format-version", "0")


@needs_fuse
@pytest.mark.mount
def test_stacked_image_adds_replaces_and_deletes(
    images: Images, upper: Path, tmp_path: Path, mounts: Mounts
) -> None:
    out = tmp_path / "stacked.ocix"
    result = compose_cli(out, images.minbase, upper, "--json")
    summary = json.loads(result.stdout)
    assert (summary["version"], summary["parts"][1]["version"]) == (1, 0)  # v1 base, v0 upper
    assert summary["parts"][1]["unmatched_whiteouts"] == ["/nothing-here"]
    # empty, user, user/notes, ping6, and the two files the opaque whiteout hides
    assert summary["parts"][1]["deleted"] == 6
    args = store_args(os.fspath(images.store), tmp_path / "cache")
    with mounts(out, tmp_path / "mnt", *args) as mount:
        root = mount.mountpoint
        seen = snapshot_dir(root)
        expected = snapshot_dir(images.minbase_root)
        for gone in ("/etc/empty", "/home/user", "/home/user/notes", "/usr/bin/ping6",
                     "/usr/share/doc/base/copyright"):
            del expected[gone]
        for name in ("/aping", "/usr/bin/ping"):
            expected[name] = FileState(**{**expected[name].__dict__,
                                          "links": expected[name].links - {"/usr/bin/ping6"}})
        assert set(seen) == set(expected) | {"/etc/motd"}
        assert not [path for path in seen if "/.wh." in path]
        assert (root / "etc/hostname").read_bytes() == b"upper\n"
        assert (root / "etc/motd").read_bytes() == b"added by the upper image\n"
        assert (root / "usr/share/doc/base/readme").read_bytes() == b"the upper readme\n"
        assert os.stat(root / "usr/bin/ping").st_nlink == 2
        unchanged = set(expected) - {"/etc/hostname", "/usr/share/doc/base/readme",
                                     "/etc", "/home", "/usr/share/doc/base", "/usr/bin",
                                     "/usr", "/usr/share", "/usr/share/doc", "/"}
        assert {p: seen[p] for p in unchanged} == {p: expected[p] for p in unchanged}
        shell = chroot(root, "/bin/sh", "-c", "read h < /etc/hostname; echo $h")
        assert shell.stdout == "upper\n", shell.stderr


def test_replacing_a_hardlinked_file_is_an_error_unless_relinked(
    images: Images, tmp_path: Path
) -> None:
    top = tmp_path / "top"
    top.mkdir()
    (top / "aping").write_bytes(b"a new file at the hardlinks' target\n")
    image = build(top, images.store, tmp_path / "top.ocix")
    out = tmp_path / "out.ocix"
    failed = compose_cli(out, images.minbase, image, check=False)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"ocixfs: /aping: {image} replaces a file that lower "
                                    "hardlinks still name (/usr/bin/ping, /usr/bin/ping6)")
    assert "/usr/bin/ping" in failed.stderr and "--relink" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1 and not out.exists()

    compose_cli(out, images.minbase, image, "--relink")
    base = load_image(os.fspath(images.minbase)).manifest
    entries = load_image(os.fspath(out)).manifest.entries
    assert base.entries["/usr/bin/ping"] == Entry(Kind.HARDLINK, target="/aping")
    assert entries["/usr/bin/ping"] == base.entries["/aping"]  # content, suid, capability
    assert entries["/usr/bin/ping6"] == Entry(Kind.HARDLINK, target="/usr/bin/ping")
    assert entries["/aping"].kind is Kind.REGULAR
    assert entries["/aping"].digest != base.entries["/aping"].digest


# ---- conflicts and rules, on small manifests -----------------------------------------------


def regular(data: bytes = b"x", **meta: Any) -> Entry:
    import blake3

    return Entry(Kind.REGULAR, mode=0o644, size=len(data),
                 digest=blake3.blake3(data).digest() if data else None, **meta)


DIR = Entry(Kind.DIRECTORY, mode=0o755)


def run(*parts: tuple[str, Manifest], relink: bool = False) -> Manifest:
    given = [(part, part.image, "b3:" + "0" * 64, manifest)
             for part, manifest in ((parse_part(spec), manifest) for spec, manifest in parts)]
    return compose(given, relink=relink).manifest


BASE = Manifest(1, {
    "/": DIR, "/etc": DIR, "/etc/hostname": regular(b"base\n"),
    "/bin": Entry(Kind.SYMLINK, mode=0o777, target="usr/bin"),
    "/usr/bin/tool": regular(b"tool", xattrs={"user.a": b"1"}),
})


@pytest.mark.parametrize(("upper", "message"), [
    ({"/etc": regular()}, "/etc: upper has a regular file here, but base has a directory"),
    ({"/etc/hostname/x": regular()},
     "/etc/hostname: upper needs a directory here, but base has a regular file"),
    ({"/bin/x": regular()}, "/bin: upper needs a directory here, but base has a symlink"),
    ({"/usr": Entry(Kind.FIFO, mode=0o644)},  # /usr is implicit in the base
     "/usr: upper has a fifo here, but lower parts have a directory"),
    ({"/etc/.wh.x": regular(b"not empty")}, "a whiteout must be an empty regular file"),
    ({"/etc/.wh.x/y": regular()}, "a whiteout cannot have entries below it"),
])
def test_conflicts_are_errors(upper: dict[str, Entry], message: str) -> None:
    with pytest.raises(ComposeError, match=message.replace(".", r"\.")):
        run(("base", BASE), ("upper", Manifest(0, upper)))


def test_embedding_conflicts_name_the_part_and_its_place() -> None:
    part = Manifest(0, {"/x": regular()})
    with pytest.raises(ComposeError, match=r"^/etc/hostname: app \(at /etc/hostname/app\) "
                                           "needs a directory here, but base has a regular"):
        run(("base", BASE), ("app:/etc/hostname/app", part))
    with pytest.raises(ComposeError, match="^/bin: app .at /bin/app. needs a directory "
                                           "here, but base has a symlink$"):
        run(("base", BASE), ("app:/bin/app", part))


def test_a_whiteout_in_the_same_part_replaces_a_directory_with_a_file() -> None:
    result = run(("base", BASE), ("upper", Manifest(0, {
        "/.wh.etc": regular(b""), "/etc": regular(b"now a file")})))
    assert result.entries["/etc"] == regular(b"now a file")
    assert "/etc/hostname" not in result.entries
    assert result.entries["/usr/bin/tool"] == BASE.entries["/usr/bin/tool"]


def test_directories_merge_and_implicit_ones_keep_lower_metadata() -> None:
    owned = Entry(Kind.DIRECTORY, mode=0o700, uid=5, mtime=7)
    base = Manifest(0, {"/opt": owned, "/opt/a": regular(b"a")})
    result = run(("base", base), ("upper", Manifest(0, {"/opt/b": regular(b"b")})))
    assert result.entries["/opt"] == owned  # the upper only implies /opt
    assert set(result.entries) == {"/opt", "/opt/a", "/opt/b"}
    explicit = run(("base", base), ("upper", Manifest(0, {"/opt": DIR})))
    assert explicit.entries["/opt"] == DIR
    assert explicit.entries["/opt/a"] == regular(b"a")


def test_versions_hardlinks_and_canonical_order_when_embedding() -> None:
    # "/b" is the group's target in the part; under /zz/ its names keep their order.
    part = Manifest(0, {"/b": regular(b"linked"), "/a/c": Entry(Kind.HARDLINK, target="/b")})
    v0 = run(("base", Manifest(0, {"/etc": DIR})), ("part:/zz", part))
    assert v0.version == 0
    assert v0.entries["/zz/a/c"] == Entry(Kind.HARDLINK, target="/zz/b")
    assert run(("base", BASE), ("part:/zz", part)).version == 1
    assert run(("part:/zz", part), ("base", BASE)).version == 1
    embedded_first = run(("part:/zz", part))
    assert set(embedded_first.entries) == {"/zz", "/zz/b", "/zz/a", "/zz/a/c"}
    assert encode(embedded_first) == encode(decode(encode(embedded_first)))


def test_an_embedded_path_that_grows_too_long_is_a_format_error() -> None:
    deep = "/" + "/".join(["d" * 200] * 20)  # 4020 bytes: fits alone, not under /long/...
    part = Manifest(0, {deep: regular()})
    with pytest.raises(Exception, match="longer than 4096 bytes"):
        run(("base", BASE), ("part:/" + "x" * 100, part))


@pytest.mark.parametrize(("text", "part"), [
    ("a.ocix", Part("a.ocix")),
    ("a.ocix:/srv/app", Part("a.ocix", "/srv/app")),
    ("a.ocix:/srv/app/", Part("a.ocix", "/srv/app")),
    ("http://host:8080/a.ocix", Part("http://host:8080/a.ocix")),
    ("https://host/a.ocix:/srv", Part("https://host/a.ocix", "/srv")),
    ("odd:/name.ocix:/", Part("odd:/name.ocix", "/")),
])
def test_part_syntax(text: str, part: Part) -> None:
    assert parse_part(text) == part


def test_part_paths_must_be_canonical() -> None:
    with pytest.raises(UsageError, match="not a canonical absolute path"):
        parse_part("a.ocix:/srv/../etc")


# ---- the command line -------------------------------------------------------------------------


def test_missing_blobs_in_the_store_fail_before_writing(images: Images, tmp_path: Path) -> None:
    partial = tmp_path / "partial-store"
    shutil.copytree(images.store, partial, copy_function=os.link)
    victim = next(iter(blob_digests(images.python))).hex()
    (partial / "blobs" / "blake3" / victim).unlink()
    out = tmp_path / "out.ocix"
    out.write_bytes(b"the previous file")
    failed = compose_cli(out, images.minbase, f"{images.python}:/srv/app", "--store",
                         os.fspath(partial), check=False)
    assert failed.returncode == 1
    assert "blobs referenced are missing" in failed.stderr and victim in failed.stderr
    assert out.read_bytes() == b"the previous file"
    assert sorted(os.listdir(tmp_path)) == ["out.ocix", "partial-store"]


def test_output_rules(images: Images, tmp_path: Path) -> None:
    (tmp_path / "dir.ocix").mkdir()
    (tmp_path / "link.ocix").symlink_to(tmp_path / "elsewhere.ocix")
    for out, message in ((tmp_path / "dir.ocix", "is a directory"),
                         (tmp_path / "link.ocix", "is a symlink"),
                         (tmp_path / "no" / "out.ocix", "is not a directory")):
        failed = compose_cli(out, images.minbase, check=False)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    assert not (tmp_path / "elsewhere.ocix").exists()
    failed = compose_cli(tmp_path / "x.ocix", tmp_path / "missing.ocix", check=False)
    assert failed.returncode == 2 and "No such file" in failed.stderr
    assert sorted(os.listdir(tmp_path)) == ["dir.ocix", "link.ocix"]


def test_a_closed_stdout_does_not_traceback(images: Images, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = tmp_path / "out.ocix"
    try:
        proc = subprocess.run([*OCIXFS, "compose", os.fspath(out), os.fspath(images.minbase)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""  # as any command on a closed pipe
    assert out.read_bytes() == images.minbase.read_bytes()


def test_help_describes_every_option() -> None:
    result = subprocess.run([sys.executable, "-m", "ocixfs", "compose", "--help"],
                            capture_output=True, text=True, check=True)
    for option in ("--store", "--relink", "--json", "IMAGE:/PATH", ".wh..wh..opq"):
        assert option in result.stdout


def test_snapshot_of_embedded_manifest_matches_the_tree(images: Images, embedded: Path) -> None:
    """Without FUSE: the composed manifest, read back from the store, shows the python tree
    at /srv/app (the mount test checks the same through the kernel)."""
    states = snapshot_manifest(load_image(os.fspath(embedded)).manifest, images.store)
    python = snapshot_dir(images.python_root)
    assert under(states, "/srv/app") == python
