"""The human-readable rendering of ``ocixfs stats`` (the JSON form is used by mount tests)."""

from __future__ import annotations

from ocixfs.cli.stats import format_stats

SAMPLE = {
    "mountpoint": "/mnt/root",
    "image": "/srv/debian.ocix",
    "image_digest": "b3:" + "ab" * 32,
    "stores": ["http://127.0.0.1:8080/", "http://mirror/"],
    "cache_dir": "/var/cache/ocixfs",
    "pid": 4242,
    "uptime_s": 12.5,
    "image_files": {"files": 10, "files_local": 4, "bytes": 3 << 20, "bytes_local": 1536},
    "prefetch": None,
    "profile_files": 7,
    "reader": {"blobs_fetched": 4, "errors": {"timeout": 2}},
    "fs": {"reads": 9, "errors": {}},
}


def test_every_group_and_counter_is_shown() -> None:
    text = format_stats(SAMPLE)
    assert "mountpoint   /mnt/root" in text
    assert "http://127.0.0.1:8080/, http://mirror/" in text
    assert "pid 4242" in text
    assert "local        4/10 files, 1.5 KiB/3.0 MiB" in text
    assert "profile      7 files accessed so far" in text
    assert "prefetch:" not in text  # no prefetch ran
    lines = text.splitlines()
    assert lines.index("reader:") < lines.index("fs:")
    assert "    timeout" in text and "  blobs_fetched" in text


def test_a_running_prefetch_is_shown() -> None:
    text = format_stats({**SAMPLE, "prefetch": {"done_blobs": 3, "planned_blobs": 8}})
    assert "prefetch:" in text
    assert "done_blobs" in text and "planned_blobs" in text
