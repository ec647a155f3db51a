"""``ocixfs metrics``: this user's mounts in the Prometheus text format."""

from __future__ import annotations

import argparse

NAME = "metrics"
HELP = "print the counters of every mount of this user as Prometheus text"
DESCRIPTION = """\
Print what every running mount of this user (root: of the host) has read, fetched and
failed, per mount (labels mountpoint and image_digest) and in total, in the Prometheus
text format. The ocixfs service answers the same text to 'GET /metrics' on its socket:

  curl --unix-socket /run/ocixfs/service.sock http://localhost/metrics
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from ocixfs.mount.metrics import host_metrics

    print(host_metrics(), end="")
    return 0
