"""OCI registries as stores: ``ocixfs push`` to a real docker-registry, mounts straight
from it, registries among mirrors, a registry that swaps a blob, the token flow with
logins from auth files, and one-line errors."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from ocixfs.errors import UsageError
from ocixfs.mount.profile import Profile, encode_profile
from ocixfs.store.layout import blob_path
from ocixfs.store.spec import RegistryStore, parse_store
from tests.mounting import Mounts, is_mounted, needs_fuse, run_ocixfs, wait_for
from tests.nginx import Nginx
from tests.registries import Registry, TokenService, free_port, needs_registry

FILES = {f"usr/lib/mod{i}.py": (f"# module {i}\n".encode() * (200 + 37 * i)) for i in range(12)}
FILES["etc/motd"] = b"hello from a registry\n"
PROFILED = ["/usr/lib/mod3.py", "/usr/lib/mod7.py", "/etc/motd"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An image built (zstd store, the default) from a small tree, with IMAGE.profile."""
    source = tmp_path / "tree"
    for name, data in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(store),
               "--output", os.fspath(store / "image.ocix"))
    profile = Profile(tuple((path, 10 * n) for n, path in enumerate(PROFILED)))
    (store / "image.ocix.profile").write_bytes(encode_profile(profile))
    return store / "image.ocix"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as running:
        yield running


def push(image: Path, ref: str, *more: str) -> dict[str, object]:
    result = run_ocixfs("push", os.fspath(image), ref, "--json", *more)
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def assert_one_line_failure(args: list[str], mountpoint: Path | None = None) -> str:
    result = run_ocixfs(*args, check=False, timeout=60)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocixfs: "), result.stderr
    if mountpoint is not None:
        assert not is_mounted(mountpoint)
    return lines[0]


def test_registry_references_parse_like_skopeo() -> None:
    store = parse_store("docker://127.0.0.1:5000/team/app:v1")
    assert store == RegistryStore("127.0.0.1:5000", "team/app", "v1")
    assert store.loopback
    digest = "sha256:" + "ab" * 32
    pinned = parse_store(f"docker://registry.example.org/app@{digest}")
    assert isinstance(pinned, RegistryStore) and pinned.pinned and not pinned.loopback
    assert parse_store("docker://ubuntu") == RegistryStore("docker.io", "library/ubuntu", "latest")
    for bad in ("docker://host.io/UPPER", "docker://host.io/app@sha256:12", "docker://h.io/"):
        with pytest.raises(UsageError, match="not a registry reference"):
            parse_store(bad)
    with pytest.raises(UsageError) as refused:
        parse_store("docker://user:hunter2@host.io/app")
    assert "hunter2" not in str(refused.value)


@needs_registry
@needs_fuse
def test_push_then_mount_from_the_registry_plays_its_profile(
    image: Path, registry: Registry, mounts: Mounts, tmp_path: Path
) -> None:
    ref = registry.ref("team/app:v1")
    first = push(image, ref)
    assert first["blobs"] == len(FILES) and first["uploaded"] == len(FILES)
    assert first["skipped"] == 0
    again = push(image, ref)
    assert (again["uploaded"], again["skipped"]) == (0, len(FILES))
    assert again["digest"] == first["digest"]

    mount = mounts(ref, tmp_path / "mnt", "--cache-dir", os.fspath(tmp_path / "c"))
    mount.start()
    wait_for(lambda: (mount.stats()["prefetch"] or {}).get("finished") is True, what="prefetch")
    prefetch = mount.stats()["prefetch"]
    assert isinstance(prefetch, dict)
    assert (prefetch["planned_blobs"], prefetch["done_blobs"]) == (len(PROFILED),) * 2
    for name, data in FILES.items():
        assert (mount.mountpoint / name).read_bytes() == data
    assert mount.stats()["stores"] == [f"{registry.ref('team/app')}@{first['digest']}"]


@needs_registry
@needs_fuse
def test_a_swapped_blob_is_refused_and_the_next_mirror_serves_it(
    image: Path, registry: Registry, mounts: Mounts, tmp_path: Path
) -> None:
    ref = registry.ref("team/app:v1")
    push(image, ref)
    data = FILES["usr/lib/mod5.py"]
    stored = blob_path(image.parent, blake3.blake3(data).digest(), zstd=True)
    on_disk = registry.blob_data("sha256:" + hashlib.sha256(stored.read_bytes()).hexdigest())
    on_disk.write_bytes(os.urandom(len(stored.read_bytes())))  # same size, other bytes

    alone = mounts(ref, tmp_path / "alone", "--cache-dir", os.fspath(tmp_path / "c"),
                   "--prefetch", "none", "--log-file", os.fspath(tmp_path / "a.log"))
    alone.start()
    with pytest.raises(OSError) as failed:
        (alone.mountpoint / "usr/lib/mod5.py").read_bytes()
    assert failed.value.errno == errno.EIO
    assert "sha256 is not" in (tmp_path / "a.log").read_text()
    alone.stop()

    with Nginx(image.parent, tmp_path / "nginx") as nginx:
        mixed = mounts(
            ref, tmp_path / "mixed", "--cache-dir", os.fspath(tmp_path / "c"),
            "--prefetch", "none", "--store", ref, "--store", nginx.url,
            "--store", os.fspath(image.parent))
        mixed.start()
        assert (mixed.mountpoint / "usr/lib/mod5.py").read_bytes() == data
        assert (mixed.mountpoint / "etc/motd").read_bytes() == FILES["etc/motd"]
        reader = mixed.stats()["reader"]
        assert isinstance(reader, dict)
        assert reader["errors"]["corrupt"] >= 1
        # the registry failed: it is tried after the healthy mirrors for a while
        assert reader["blobs_by_source"] == {nginx.url: 2}


@needs_registry
@needs_fuse
def test_a_pinned_mount_and_one_line_errors(
    image: Path, registry: Registry, mounts: Mounts, tmp_path: Path
) -> None:
    summary = push(image, registry.ref("team/app:v1"))
    pinned = registry.ref(f"team/app@{summary['digest']}")
    cache = ["--cache-dir", os.fspath(tmp_path / "c")]
    mount = mounts(pinned, tmp_path / "mnt", *cache)
    mount.start()
    assert (mount.mountpoint / "etc/motd").read_bytes() == FILES["etc/motd"]
    mount.stop()

    target = tmp_path / "never"
    target.mkdir()
    wrong_tag = assert_one_line_failure(
        ["mount", registry.ref("team/app:v2"), os.fspath(target), *cache], target)
    assert "no such tag" in wrong_tag
    unknown = assert_one_line_failure(
        ["mount", registry.ref("nobody/here:v1"), os.fspath(target), *cache], target)
    assert "no such repository" in unknown or "no such tag" in unknown
    other = "sha256:" + "0" * 64
    assert_one_line_failure(["mount", registry.ref(f"team/app@{other}"), os.fspath(target),
                             *cache], target)
    down = f"docker://127.0.0.1:{free_port()}/team/app:v1"
    assert "ConnectError" in assert_one_line_failure(
        ["mount", down, os.fspath(target), *cache], target)
    assert_one_line_failure(["push", os.fspath(image), down])


@needs_registry
@needs_fuse
def test_a_token_registry_works_with_a_login_from_a_docker_config(
    image: Path, mounts: Mounts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", os.fspath(tmp_path / "xdg"))
    docker = tmp_path / "docker"
    docker.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", os.fspath(docker))
    with (TokenService(tmp_path / "token", ("alice", "s3cret-pw")) as tokens,
          Registry(tmp_path / "registry", token=tokens) as registry):
        ref = registry.ref("team/app:v1")
        anonymous = assert_one_line_failure(["push", os.fspath(image), ref])
        assert "requires a login" in anonymous

        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({"auths": {registry.host: {
            "auth": base64.b64encode(b"alice:not-the-password").decode()}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", os.fspath(wrong))
        refused = assert_one_line_failure(["push", os.fspath(image), ref])
        assert "refused the login" in refused and "not-the-password" not in refused
        monkeypatch.delenv("REGISTRY_AUTH_FILE")

        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {
            "auth": base64.b64encode(b"alice:s3cret-pw").decode()}}}))
        summary = push(image, ref)
        assert summary["uploaded"] == len(FILES)
        assert tokens.issued <= 2  # one token per scope, reused by every upload

        mount = mounts(ref, tmp_path / "mnt", "--cache-dir", os.fspath(tmp_path / "c"))
        mount.start()
        for name, data in FILES.items():
            assert (mount.mountpoint / name).read_bytes() == data
