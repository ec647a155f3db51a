"""The resident host service (``ocixfs service``, ``mount/service.py``): root's ``ocixfs
mount`` starts it on first use and runs in a worker forked from it; mounts outlive it;
metrics are Prometheus text.

Every test has its own service directory (``OCIXFS_SERVICE_DIR``, so no test meets the
host's service or another test's) and the ``host`` fixture stops whatever it started: the
service, the mounts, and (a safety net) any process that still carries its directory in its
environment. The rest of the suite mounts in-process (``tests/conftest.py`` sets
``OCIXFS_NO_SERVICE``); these tests run ``ocixfs`` without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ocixfs.mount.serviceclient import SYSTEMD_BOOTED
from tests.faultserver import Fault, FaultServer
from tests.forwardproxy import ForwardProxy
from tests.mounting import (
    OCIXFS,
    force_unmount,
    is_mounted,
    needs_fuse,
    process_alive,
    run_ocixfs,
    wait_for,
)
from tests.servers import FaultServers

pytestmark = [needs_fuse, pytest.mark.mount]

REPO = Path(__file__).resolve().parent.parent
FILES = {"etc/hostname": b"service-test\n", "data/a.txt": b"alpha\n" * 1000,
         "data/b.bin": os.urandom(200_000)}
NOBODY = 65534


class Host:
    """``ocixfs`` as a root user runs it, with the service on, in a private directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = {k: v for k, v in os.environ.items() if k != "OCIXFS_NO_SERVICE"}
        self.env["OCIXFS_SERVICE_DIR"] = os.fspath(directory)
        self.mountpoints: list[Path] = []

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*OCIXFS, *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def mount(self, image: Path | str, mountpoint: Path, *args: str,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Mount through the service (``mountpoint`` relative to ``cwd``); the daemon's pid."""
        where = cwd / mountpoint if cwd else mountpoint
        where.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(where)
        result = self.run("mount", os.fspath(image), os.fspath(mountpoint), *args, env=env,
                          cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert is_mounted(where)
        return daemon_pid(where)

    def service_pid(self) -> int | None:
        result = self.run("service", "status", "--json")
        return int(json.loads(result.stdout)["pid"]) if result.returncode == 0 else None

    def close(self) -> None:
        for mountpoint in self.mountpoints:
            if is_mounted(mountpoint):
                run_ocixfs("umount", os.fspath(mountpoint), check=False, timeout=60)
            force_unmount(mountpoint)
        self.run("service", "stop", timeout=30)
        for pid in self.processes():  # nothing may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def processes(self) -> list[int]:
        """Processes started with this host's service directory in their environment."""
        marker = f"OCIXFS_SERVICE_DIR={self.directory}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
        return [pid for pid in found if process_alive(pid)]


def daemon_pid(mountpoint: Path) -> int:
    stats = json.loads(run_ocixfs("stats", os.fspath(mountpoint), "--json").stdout)
    return int(stats["pid"])


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocixfs: "), stderr
    return lines[0]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """A private service directory. Where systemd is PID 1 a mount never starts the service
    itself (the unit does), so these tests, which count on that, are skipped there."""
    if os.path.isdir(SYSTEMD_BOOTED):
        pytest.skip("systemd runs this host: mounts do not start the service themselves")
    made = Host(tmp_path / "service")
    yield made
    made.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image (manifest, store) of ``FILES``."""
    base = tmp_path_factory.mktemp("image")
    for name, content in FILES.items():
        (base / "root" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "root" / name).write_bytes(content)
    run_ocixfs("build", f"dir:{base / 'root'}", "--store", os.fspath(base / "store"),
               "--output", os.fspath(base / "image.ocix"))
    return base / "image.ocix", base / "store"


def mount_args(store: Path | str, cache: Path) -> list[str]:
    return ["--store", os.fspath(store), "--cache-dir", os.fspath(cache)]


def assert_serves(mountpoint: Path) -> None:
    for name, content in FILES.items():
        assert (mountpoint / name).read_bytes() == content


# -- starting and reusing ------------------------------------------------------------------


def test_the_first_mount_starts_the_service_and_the_next_reuses_it(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    assert host.service_pid() is None
    first = host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    service = host.service_pid()
    assert service is not None and process_alive(service)
    second = host.mount(ocix, tmp_path / "m2", *mount_args(store, tmp_path / "cache"))
    assert host.service_pid() == service
    assert_serves(tmp_path / "m1")
    assert_serves(tmp_path / "m2")
    # The daemons are not the service's children: they live on without it.
    assert service not in (first, second, parent_pid(first), parent_pid(second))
    assert os.stat(host.directory / "service.sock").st_mode & 0o777 == 0o600


def test_the_mount_helper_goes_through_the_service(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    """``mount.fuse.ocixfs`` (mount(8), fstab) is ``ocixfs mount`` underneath."""
    ocix, store = image
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    host.mountpoints.append(mountpoint)
    helper = Path(sys.executable).parent / "mount.fuse.ocixfs"
    result = subprocess.run([os.fspath(helper), os.fspath(ocix), os.fspath(mountpoint), "-o",
                             f"store={store},cache={tmp_path / 'cache'},rw"], env=host.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_serves(mountpoint)
    assert host.service_pid() is not None


def test_two_first_mounts_at_once_start_one_service(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    mountpoints = [tmp_path / "m1", tmp_path / "m2"]
    for mountpoint in mountpoints:
        mountpoint.mkdir()
        host.mountpoints.append(mountpoint)
    started = [subprocess.Popen([*OCIXFS, "mount", os.fspath(ocix), os.fspath(mountpoint),
                                 *mount_args(store, tmp_path / "cache")], env=host.env,
                                stderr=subprocess.PIPE, text=True)
               for mountpoint in mountpoints]
    for process in started:
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
    daemons = {daemon_pid(mountpoint) for mountpoint in mountpoints}
    services = [pid for pid in host.processes() if pid not in daemons]
    assert services == [host.service_pid()]


def test_foreground_and_no_service_mount_in_their_own_process(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    (tmp_path / "fg").mkdir()
    host.mountpoints += [tmp_path / "fg", tmp_path / "own"]
    foreground = subprocess.Popen([*OCIXFS, "mount", "--foreground", os.fspath(ocix),
                                   os.fspath(tmp_path / "fg"),
                                   *mount_args(store, tmp_path / "cache")], env=host.env,
                                  stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(tmp_path / "fg"), what="the foreground mount")
        assert daemon_pid(tmp_path / "fg") == foreground.pid
        (tmp_path / "own").mkdir()
        result = host.run("mount", "--no-service", os.fspath(ocix), os.fspath(tmp_path / "own"),
                          *mount_args(store, tmp_path / "cache"))
        assert result.returncode == 0, result.stderr
        assert_serves(tmp_path / "own")
        assert host.service_pid() is None  # neither started it
    finally:
        foreground.terminate()
        foreground.wait(timeout=60)


def test_abbreviated_in_process_options_keep_the_mount_in_process(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    """The client hands ``mount`` to the service before parsing anything: an option that
    keeps it in-process still does when argparse would take it (a unique prefix)."""
    ocix, store = image
    (tmp_path / "own").mkdir()
    host.mountpoints.append(tmp_path / "own")
    result = host.run("mount", "--no-serv", os.fspath(ocix), os.fspath(tmp_path / "own"),
                      *mount_args(store, tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert_serves(tmp_path / "own")
    assert host.service_pid() is None


def test_a_usage_error_through_the_service_is_that_of_argparse_in_process(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    (tmp_path / "mnt").mkdir()
    args = [os.fspath(ocix), os.fspath(tmp_path / "mnt"), "--no-such-option",
            *mount_args(store, tmp_path / "cache")]
    through = host.run("mount", *args)
    alone = host.run("mount", *args, env={"OCIXFS_NO_SERVICE": "1"})
    assert host.service_pid() is not None
    assert (through.returncode, through.stdout, through.stderr) == (
        alone.returncode, alone.stdout, alone.stderr)
    assert through.returncode == 2 and "--no-such-option" in through.stderr
    assert not is_mounted(tmp_path / "mnt")


# -- errors, environment ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing mountpoint", "bad manifest", "bad option"])
def test_errors_through_the_service_are_those_of_an_in_process_mount(
    tmp_path: Path, host: Host, image: tuple[Path, Path], case: str
) -> None:
    ocix, store = image
    mountpoint = tmp_path / "mnt"
    if case == "missing mountpoint":
        args = [os.fspath(ocix), os.fspath(tmp_path / "missing")]
    elif case == "bad manifest":
        (tmp_path / "bad.ocix").write_bytes(b"not a manifest")
        mountpoint.mkdir()
        args = [os.fspath(tmp_path / "bad.ocix"), os.fspath(mountpoint)]
    else:
        mountpoint.mkdir()
        args = [os.fspath(ocix), os.fspath(mountpoint), "-o", "nosuchoption"]
    args += mount_args(store, tmp_path / "cache")
    through = host.run("mount", *args)
    alone = host.run("mount", *args, env={"OCIXFS_NO_SERVICE": "1"})
    assert host.service_pid() is not None  # the first did go through the service
    assert (through.returncode, through.stdout, through.stderr) == (
        alone.returncode, alone.stdout, alone.stderr)
    assert through.returncode == (1 if case == "bad manifest" else 2)
    one_line(through.stderr)
    assert not is_mounted(mountpoint)


def test_the_callers_environment_and_directory_apply(
    tmp_path: Path, host: Host, image: tuple[Path, Path], serve: FaultServers
) -> None:
    ocix, store = image
    origin: FaultServer = serve(store)
    host.run("service", "start")  # running before the caller's environment exists
    with ForwardProxy() as proxy:
        proxy_env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "",
                     "no_proxy": ""}
        # Relative paths: the worker works in the caller's directory.
        shutil.copy(ocix, tmp_path / "image.ocix")
        host.mount("image.ocix", Path("mnt"), *mount_args(origin.url, tmp_path / "cache"),
                   env=proxy_env, cwd=tmp_path)
        assert (tmp_path / "mnt/data/b.bin").read_bytes() == FILES["data/b.bin"]
        assert any("/blobs/" in url for url in proxy.requests), proxy.requests
    stats = json.loads(run_ocixfs("stats", os.fspath(tmp_path / "mnt"), "--json").stdout)
    assert stats["image"] == os.fspath(tmp_path / "image.ocix")


def stalled_mount(tmp_path: Path, image: tuple[Path, Path], serve: FaultServers,
                  mountpoint: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """An ``ocixfs mount`` (stderr piped) whose manifest download hangs, once it does."""
    ocix, store = image
    server = serve(ocix.parent)
    server.fault(ocix.name, Fault(stall=60.0))
    mountpoint.mkdir()
    client = subprocess.Popen([*OCIXFS, "mount", f"{server.url}/{ocix.name}",
                               os.fspath(mountpoint), *mount_args(store, tmp_path / "cache"),
                               "--timeout", "3"],  # how long the stalled download lingers
                              env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: server.count(ocix.name) > 0, what="the manifest request")
    return client


@pytest.mark.parametrize("through_service", [True, False])
def test_ctrl_c_on_the_client_interrupts_the_mount_as_in_process(
    tmp_path: Path, host: Host, image: tuple[Path, Path], serve: FaultServers,
    through_service: bool,
) -> None:
    """SIGINT to the client reaches the worker: the same line and status as in-process,
    and nothing mounted."""
    mountpoint = tmp_path / "mnt"
    env = host.env if through_service else {**host.env, "OCIXFS_NO_SERVICE": "1"}
    client = stalled_mount(tmp_path, image, serve, mountpoint, env)
    try:
        client.send_signal(signal.SIGINT)
        _, stderr = client.communicate(timeout=60)
    finally:
        client.kill()
    assert client.returncode == 130
    assert one_line(stderr) == "ocixfs: interrupted"
    assert not is_mounted(mountpoint)
    assert (host.service_pid() is not None) == through_service


# -- failures: daemons, the service, its socket ------------------------------------------------


def test_a_worker_killed_during_a_mount_fails_that_mount_alone(
    tmp_path: Path, host: Host, image: tuple[Path, Path], serve: FaultServers
) -> None:
    ocix, store = image
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    service = host.service_pid()
    assert service is not None
    client = stalled_mount(tmp_path, image, serve, tmp_path / "m2", host.env)
    try:
        children = Path(f"/proc/{service}/task/{service}/children").read_text().split()
        assert len(children) == 1  # the worker running this mount
        os.kill(int(children[0]), signal.SIGKILL)
        _, stderr = client.communicate(timeout=60)
    finally:
        client.kill()
    assert client.returncode == 1
    assert f"worker {children[0]} died" in one_line(stderr)
    assert not is_mounted(tmp_path / "m2")
    assert_serves(tmp_path / "m1")
    assert host.service_pid() == service


def test_a_killed_mount_daemon_loses_only_its_mount(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    doomed = host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    host.mount(ocix, tmp_path / "m2", *mount_args(store, tmp_path / "cache"))
    service = host.service_pid()
    os.kill(doomed, signal.SIGKILL)
    wait_for(lambda: not process_alive(doomed), what="the daemon to die")
    with pytest.raises(OSError):
        (tmp_path / "m1/data/a.txt").read_bytes()
    assert_serves(tmp_path / "m2")
    host.mount(ocix, tmp_path / "m3", *mount_args(store, tmp_path / "cache"))
    assert_serves(tmp_path / "m3")
    assert host.service_pid() == service


def test_a_killed_service_leaves_mounts_serving_and_the_next_mount_starts_another(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    service = host.service_pid()
    assert service is not None
    os.kill(service, signal.SIGKILL)
    wait_for(lambda: not process_alive(service), what="the service to die")
    assert (host.directory / "service.sock").exists()  # stale now
    assert_serves(tmp_path / "m1")
    assert daemon_pid(tmp_path / "m1")  # its control socket still answers
    host.mount(ocix, tmp_path / "m2", *mount_args(store, tmp_path / "cache"))
    assert host.service_pid() not in (None, service)
    assert_serves(tmp_path / "m2")


def test_a_stopped_service_leaves_mounts_serving(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    stopped = host.run("service", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not (host.directory / "service.sock").exists()
    assert host.run("service", "status").returncode == 3
    assert_serves(tmp_path / "m1")


def test_a_service_running_older_code_is_started_anew(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    """After an upgrade, the next mount stops the service that imported the old modules."""
    import ocixfs

    ocix, store = image
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    old = host.service_pid()
    os.utime(ocixfs.__file__)  # as an upgrade would leave it: newer than the service
    host.mount(ocix, tmp_path / "m2", *mount_args(store, tmp_path / "cache"))
    assert host.service_pid() not in (None, old)
    assert old is not None and not process_alive(old)
    assert_serves(tmp_path / "m1")
    assert_serves(tmp_path / "m2")


def test_a_stale_socket_is_replaced(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    host.directory.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: refused
        stale.bind(os.fspath(host.directory / "service.sock"))
    os.chmod(host.directory / "service.sock", 0o600)
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    assert host.service_pid() is not None
    assert_serves(tmp_path / "m1")


@pytest.mark.parametrize("fault", ["directory writable by others", "socket mode 0666",
                                   "not a socket"])
def test_a_service_path_of_the_wrong_kind_is_one_line_and_nothing_mounted(
    tmp_path: Path, host: Host, image: tuple[Path, Path], fault: str
) -> None:
    ocix, store = image
    host.directory.mkdir(mode=0o700)
    sock = host.directory / "service.sock"
    if fault == "directory writable by others":
        os.chmod(host.directory, 0o777)
        expected = "writable by others"
    elif fault == "socket mode 0666":
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(os.fspath(sock))
        os.chmod(sock, 0o666)
        expected = "mode 0666"
    else:
        sock.write_text("")
        expected = "not a socket"
    (tmp_path / "mnt").mkdir()
    result = host.run("mount", os.fspath(ocix), os.fspath(tmp_path / "mnt"),
                      *mount_args(store, tmp_path / "cache"))
    assert result.returncode == 1
    assert expected in one_line(result.stderr)
    assert not is_mounted(tmp_path / "mnt")
    assert host.processes() == []


def test_a_non_root_caller_is_refused_with_one_line() -> None:
    # Outside pytest's private temporary directories, so that the other user can reach it.
    base = Path(tempfile.mkdtemp(prefix="ocixfs-service-test-"))
    host = Host(base / "service")
    try:
        assert host.run("service", "start").returncode == 0
        sock = host.directory / "service.sock"
        # The command itself says so...
        _import_service_status()
        status, output = as_nobody(_service_status)
        assert status == 2 and "serves root only" in output, output
        # ...and the service refuses a direct connection even when the socket is reachable.
        for path, mode in ((base, 0o711), (host.directory, 0o711), (sock, 0o666)):
            os.chmod(path, mode)
        status, output = as_nobody(_connect_and_read, os.fspath(sock))
        assert output == "refused the ocixfs service serves root only\n"
    finally:
        host.close()
        shutil.rmtree(base)


def _service_status() -> int:
    from ocixfs.cli import main

    return main(["service", "status"])


def _import_service_status() -> None:
    """Import, as root, what ``_service_status`` runs: the user it runs as cannot read
    this interpreter's files."""
    import ocixfs.errors
    import ocixfs.log
    from ocixfs.cli import parser_for

    parser_for(["service", "status"])
    assert ocixfs.errors and ocixfs.log


def _connect_and_read(path: str) -> int:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(path)  # refused before any request is read
        sys.stdout.write(conn.recv(4096).decode())
    return 0


def as_nobody(function: object, *args: str) -> tuple[int, str]:
    """Run ``function(*args)`` in a child that has become uid/gid 65534; its status and
    what it wrote to stdout and stderr."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            status = function(*args)  # type: ignore[operator]
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


# -- metrics ---------------------------------------------------------------------------------


def http_get(address: str | tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    """The status line and body of an HTTP/1.0 GET over a Unix or TCP socket."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as conn:
        conn.settimeout(30)
        conn.connect(address)
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode().splitlines()[0], body.decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by its name, parsed by prometheus_client's parser."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def test_metrics_are_prometheus_text_per_mount_and_per_host(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    ocix, store = image
    host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
    host.mount(ocix, tmp_path / "m2", *mount_args(store, tmp_path / "cache2"))
    assert_serves(tmp_path / "m1")
    status, body = http_get(os.fspath(host.directory / "service.sock"))
    assert status == "HTTP/1.0 200 OK"
    found = samples(body)
    reads = {labels["mountpoint"]: value for labels, value in found["ocixfs_mount_reads_total"]}
    assert reads[os.fspath(tmp_path / "m1")] >= len(FILES)
    assert reads[os.fspath(tmp_path / "m2")] == 0
    digests = {labels["image_digest"] for labels, _ in found["ocixfs_mount_fetches_total"]
               if labels["mountpoint"].startswith(os.fspath(tmp_path))}
    assert len(digests) == 1 and digests.pop().startswith("b3:")
    fetched = {labels["mountpoint"]: value for labels, value in found["ocixfs_mount_fetches_total"]}
    assert fetched[os.fspath(tmp_path / "m1")] >= len(FILES)
    ((_, host_reads),) = found["ocixfs_host_reads_total"]
    assert host_reads >= sum(reads.values())
    ((_, mounts),) = found["ocixfs_host_mounts"]
    assert mounts >= 2
    assert found["ocixfs_service_start_time_seconds"][0][1] > 0
    assert http_get(os.fspath(host.directory / "service.sock"), "/nope")[0].startswith(
        "HTTP/1.0 404")
    # The command prints the same series (without the service's own).
    printed = samples(host.run("metrics").stdout)
    assert os.fspath(tmp_path / "m1") in {
        labels["mountpoint"] for labels, _ in printed["ocixfs_mount_reads_total"]}


def test_metrics_on_an_opt_in_tcp_port(tmp_path: Path, host: Host) -> None:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = subprocess.Popen([*OCIXFS, "service", "run", "--metrics-listen", f":{port}"],
                               env=host.env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: host.service_pid() == service.pid, what="the service")
        status, body = http_get(("127.0.0.1", port))
        assert status == "HTTP/1.0 200 OK"
        assert "ocixfs_host_mounts" in samples(body)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b'{"op": "stop"}\n')  # the TCP port serves metrics alone
            assert conn.recv(4096) == b""
        assert host.service_pid() == service.pid
        again = host.run("service", "run")  # a second one refuses, in one line
        assert again.returncode == 1 and "already runs" in one_line(again.stderr)
    finally:
        host.run("service", "stop")
        assert service.wait(timeout=30) == 0


# -- systemd -----------------------------------------------------------------------------------


def test_systemd_units_pass_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    units = []
    for unit in ("ocixfs.service", "ocixfs.socket"):
        text = (REPO / "systemd" / unit).read_text()
        installed = os.fspath(Path(sys.executable).parent / "ocixfs")
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/ocixfs", installed))
        units.append(os.fspath(tmp_path / unit))
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_socket_activation_serves_mounts(
    tmp_path: Path, host: Host, image: tuple[Path, Path]
) -> None:
    """The service takes the socket systemd passes (LISTEN_FDS), as ocixfs.socket does."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    ocix, store = image
    host.directory.mkdir(mode=0o700)
    sock = host.directory / "service.sock"
    activator = subprocess.Popen(
        [activate, "-l", os.fspath(sock), *OCIXFS, "service", "run"], env=host.env,
        stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, what="the activation socket")
        host.mount(ocix, tmp_path / "m1", *mount_args(store, tmp_path / "cache"))
        assert_serves(tmp_path / "m1")
        service = host.service_pid()
        assert service == activator.pid  # it execs the service on the first connection
        host.run("service", "stop")
        assert sock.exists()  # systemd's socket: the service does not remove it
    finally:
        activator.terminate()
        activator.wait(timeout=30)
