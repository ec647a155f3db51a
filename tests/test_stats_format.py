"""The human-readable rendering of ``ocixfs stats`` (the JSON form is used by mount tests)."""

from __future__ import annotations

from ocixfs.cli.stats import format_stats

SAMPLE = {
    "mountpoint": "/mnt/root",
    "image": "/srv/debian.ocix",
    "image_digest": "b3:" + "ab" * 32,
    "stores": ["http://127.0.0.1:8080/", "http://mirror/"],
    "cache_dir": "/var/cache/ocixfs",
    "log_file": "/run/ocixfs/0123.log",
    "pid": 4242,
    "uptime_s": 12.5,
    "image_files": {"files": 10, "files_local": 4, "bytes": 3 << 20, "bytes_local": 1536},
    "prefetch": None,
    "profile_files": 7,
    "reader": {"blobs_fetched": 4, "errors": {"timeout": 2}, "bytes_fetched": 1_234_567,
               "wait_seconds_max": 0.01818287099013105, "blobs_by_source": {}},
    "fs": {"reads": 9, "errors": {}},
}


def test_every_group_and_counter_is_shown() -> None:
    text = format_stats(SAMPLE)
    assert "mountpoint   /mnt/root" in text
    assert "http://127.0.0.1:8080/, http://mirror/" in text
    assert "pid 4242" in text
    assert "local        4 of 10 files, 1.54 kB of 3.15 MB" in text
    assert "profile      7 files opened so far" in text
    assert "log          /run/ocixfs/0123.log" in text
    assert "daemon       pid 4242, up 12.5 s" in text
    assert "prefetch:" not in text  # no prefetch ran
    lines = text.splitlines()
    assert lines.index("reader:") < lines.index("fs:")
    assert "    timeout" in text and "  blobs_fetched" in text


def test_numbers_are_rounded_and_empty_groups_hidden() -> None:
    """Issue 11: raw floats (``0.01818287099013105``), byte counts in bytes and headings
    over nothing (``errors:`` of a mount without errors) made the text hard to read."""
    text = format_stats(SAMPLE)
    assert "wait_seconds_max             18.2 ms" in text
    assert "bytes_fetched                1.23 MB" in text
    assert "0181828" not in text
    assert "blobs_by_source" not in text and "  errors:\n    timeout" in text
    assert text.count("errors:") == 1  # fs has none: no heading
    foreground = format_stats({**SAMPLE, "log_file": None})
    assert "log          stderr (a foreground mount)" in foreground


def test_a_running_prefetch_is_shown() -> None:
    text = format_stats({**SAMPLE, "prefetch": {"done_blobs": 3, "planned_blobs": 8}})
    assert "prefetch:" in text
    assert "done_blobs" in text and "planned_blobs" in text


def test_the_played_profile_is_named_with_its_paths_in_this_tree() -> None:
    borrowed = {"source": "borrowed", "name": "b3:" + "cd" * 32,
                "description": "borrowed from b3:" + "cd" * 32, "paths": 80, "in_tree": 78}
    text = format_stats({**SAMPLE, "played_profile": borrowed})
    assert f"played       borrowed from b3:{'cd' * 32}: 78 of its 80 paths are files of this " \
           "image" in text
    assert "played       no profile" in format_stats({**SAMPLE, "played_profile": None})


def test_who_serves_the_metadata_is_shown() -> None:
    assert "metadata     served through FUSE" in format_stats(SAMPLE)
    stacked = {**SAMPLE, "kernel_caching": {"listings": True, "symlinks": True,
                                            "metadata": True}}
    assert "metadata     served by the kernel (stacked: EROFS over FUSE)" in format_stats(stacked)
