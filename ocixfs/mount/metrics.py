"""The host's mounts in the Prometheus text format (exposition format 0.0.4, as CVMFS,
stargz-snapshotter and Nydus export theirs).

``gather`` asks every mount daemon whose control socket is in a runtime directory for its
``counters`` (each mount counts for itself; the service does not sit on the data path);
``render`` writes one series per mount (``ocixfs_mount_*``, labels ``mountpoint`` and
``image_digest``) and the host's totals (``ocixfs_host_*``: sums, a maximum for
``wait_seconds_max``). A mount's counters start at zero when it mounts and vanish with it,
so a host total can go down when a mount ends: Prometheus' ``rate()`` of the per-mount
series is the exact one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ocixfs.mount.control import ask_every_daemon

__all__ = ["Gathered", "gather", "render"]

CONTROL_TIMEOUT = 1.0
PREFIX = "ocixfs"


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    path: tuple[str, ...]  # where the value is in a mount's counters
    label: str | None = None  # the value is a mapping: one series per key, this label
    host: str | None = "sum"  # how the host's total is made ("sum", "max"), or None


METRICS = (
    _Metric("reads_total", "counter", "READ requests answered", ("fs", "reads")),
    _Metric("read_bytes_total", "counter", "bytes returned to READ requests",
            ("fs", "read_bytes")),
    _Metric("opens_total", "counter", "OPEN requests (the kernel opens files itself where it "
            "can: then only the first)", ("fs", "opens")),
    _Metric("files_read_total", "counter", "distinct files read", ("fs", "files_read")),
    _Metric("lookups_total", "counter", "LOOKUP requests answered", ("fs", "lookups")),
    _Metric("open_files", "gauge", "files open through OPEN now", ("fs", "open_files")),
    _Metric("request_errors_total", "counter", "requests answered with an error, by errno",
            ("fs", "errors"), label="errno"),
    _Metric("cache_hits_total", "counter", "chunks read that were in the cache",
            ("reader", "cache_hits")),
    _Metric("cache_misses_total", "counter", "chunks read that were not in the cache",
            ("reader", "cache_misses")),
    _Metric("waits_total", "counter", "reads that waited for the network",
            ("reader", "waits")),
    _Metric("wait_seconds_total", "counter", "time reads spent waiting for the network",
            ("reader", "wait_seconds_total")),
    _Metric("wait_seconds_max", "gauge", "the longest wait of a read for the network",
            ("reader", "wait_seconds_max"), host="max"),
    _Metric("fetches_total", "counter", "blobs fetched and verified",
            ("reader", "blobs_fetched")),
    _Metric("fetched_bytes_total", "counter", "verified bytes fetched (decoded)",
            ("reader", "bytes_fetched")),
    _Metric("fetched_by_others_total", "counter",
            "blobs another process on the host fetched while this mount waited for them",
            ("reader", "fetched_by_others")),
    _Metric("received_bytes_total", "counter",
            "bytes received from each store (as sent, failed attempts included)",
            ("reader", "bytes_received_by_source"), label="store"),
    _Metric("fetch_errors_total", "counter", "failed fetch attempts, by kind",
            ("reader", "errors"), label="kind"),
    _Metric("failed_blobs_total", "counter", "blobs that no store delivered",
            ("reader", "failed_blobs")),
    _Metric("wait_timeouts_total", "counter", "reads that gave up at their deadline",
            ("reader", "wait_timeouts")),
    _Metric("fetches_in_flight", "gauge", "blobs being fetched now", ("reader", "in_flight")),
    _Metric("fetches_queued", "gauge", "blobs waiting for a fetch slot", ("reader", "queued")),
    _Metric("background_failures_total", "counter",
            "background tasks stopped by an internal error", ("background_failures",),
            label="task"),
    _Metric("uptime_seconds", "gauge", "seconds since the mount started", ("uptime_s",),
            host=None),
)


@dataclass(frozen=True, slots=True)
class Gathered:
    """The counters of each mount that answered, and how many sockets did not."""

    mounts: list[dict[str, Any]]
    unanswered: int


def gather() -> Gathered:
    """The counters of every mount daemon of this user (``control.ask_every_daemon``); one
    that does not answer within ``CONTROL_TIMEOUT`` is counted in ``unanswered``."""
    answers, unanswered = ask_every_daemon("counters", fallback="stats",
                                           timeout=CONTROL_TIMEOUT)
    return Gathered([a for a in answers if "mountpoint" in a], len(unanswered))


def host_metrics(service: dict[str, Any] | None = None) -> str:
    """The Prometheus text of every mount of this user (and of the service, when given)."""
    return render(gather(), service)


def render(gathered: Gathered, service: dict[str, Any] | None = None) -> str:
    """The Prometheus text of ``gathered`` (and of the service, when given: its pid,
    start time and running workers)."""
    lines: list[str] = []
    for metric in METRICS:
        _family(lines, f"{PREFIX}_mount_{metric.name}", metric.kind, metric.help,
                _mount_samples(metric, gathered.mounts))
    for metric in METRICS:
        if metric.host is not None:
            _family(lines, f"{PREFIX}_host_{metric.name}", metric.kind,
                    f"{metric.help}, all mounts", _host_samples(metric, gathered.mounts))
    _family(lines, f"{PREFIX}_host_mounts", "gauge", "mounts whose daemon answered",
            [({}, len(gathered.mounts))])
    _family(lines, f"{PREFIX}_host_mounts_unanswered", "gauge",
            "control sockets that did not answer in time", [({}, gathered.unanswered)])
    if service is not None:
        _family(lines, f"{PREFIX}_service_start_time_seconds", "gauge",
                "when the ocixfs service started (Unix time)", [({}, service["started"])])
        _family(lines, f"{PREFIX}_service_workers", "gauge",
                "requests the ocixfs service is handling", [({}, service["workers"])])
    return "\n".join(lines) + "\n"


Sample = tuple[dict[str, str], float]


def _family(lines: list[str], name: str, kind: str, text: str,
            samples: Sequence[Sample]) -> None:
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        inner = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{inner}}} {_number(value)}" if inner
                     else f"{name} {_number(value)}")


def _mount_samples(metric: _Metric, mounts: Sequence[dict[str, Any]]) -> list[Sample]:
    samples: list[Sample] = []
    for counters in mounts:
        labels = {"mountpoint": str(counters["mountpoint"]),
                  "image_digest": str(counters.get("image_digest", ""))}
        samples.extend(({**labels, **extra}, value)
                       for extra, value in _values(metric, counters))
    return samples


def _host_samples(metric: _Metric, mounts: Sequence[dict[str, Any]]) -> list[Sample]:
    totals: dict[tuple[tuple[str, str], ...], float] = {}
    if metric.label is None:
        totals[()] = 0
    for counters in mounts:
        for extra, value in _values(metric, counters):
            key = tuple(extra.items())
            previous = totals.get(key, 0)
            totals[key] = max(previous, value) if metric.host == "max" else previous + value
    return [(dict(key), value) for key, value in sorted(totals.items())]


def _values(metric: _Metric, counters: dict[str, Any]) -> Iterator[Sample]:
    """The metric's value(s) in one mount's counters (nothing if it lacks them)."""
    value: Any = counters
    for step in metric.path:
        value = value.get(step) if isinstance(value, dict) else None
    if metric.label is None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield {}, value
        return
    for key, item in sorted((value or {}).items()):
        with contextlib.suppress(TypeError, ValueError):
            yield {metric.label: str(key)}, float(item)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
