"""Store names: the one parser behind ``--store`` (normalize_store) and the reader
(parse_stores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ocixfs.errors import UsageError
from ocixfs.store.spec import HttpStore, LocalStore, normalize_store, parse_stores


def test_store_names() -> None:
    assert parse_stores(["http://h/s", "file:///srv/s/", "/srv/t", "file://localhost/srv/u",
                         "file:///srv/a%20b"]) == [
        HttpStore("http://h/s"),
        LocalStore(Path("/srv/s")),
        LocalStore(Path("/srv/t")),
        LocalStore(Path("/srv/u")),
        LocalStore(Path("/srv/a b")),
    ]
    bad_names = [[], ["ftp://h/s"], ["relative/dir"], ["file://otherhost/x"], ["http:///x"],
                 ["http://h:99999/"], ["http://[::1/"], ["file://"]]
    for bad in bad_names:
        with pytest.raises(UsageError):
            parse_stores(bad)


def test_normalize_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize_store("http://h/s") == "http://h/s/"
    assert normalize_store("https://h/s/") == "https://h/s/"
    assert normalize_store("file:///nowhere") == "file:///nowhere/"  # not checked here
    assert normalize_store("file://localhost/x/") == "file://localhost/x/"
    (tmp_path / "a b" / "sub").mkdir(parents=True)
    assert normalize_store(os.fspath(tmp_path / "a b")) == (tmp_path / "a b").as_uri() + "/"
    assert normalize_store(f"{tmp_path}//a b/sub/..") == (tmp_path / "a b").as_uri() + "/"
    monkeypatch.chdir(tmp_path)
    assert normalize_store("a b") == (tmp_path / "a b").as_uri() + "/"
    assert normalize_store("./a b/sub") == (tmp_path / "a b" / "sub").as_uri() + "/"


def test_normalized_stores_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the command line passes on, the reader accepts, meaning the same store."""
    (tmp_path / "a b").mkdir()
    monkeypatch.chdir(tmp_path)
    names = [normalize_store(name) for name in ("a b", "http://h/s", "file:///srv/s")]
    assert parse_stores(names) == [
        LocalStore(tmp_path / "a b"), HttpStore("http://h/s/"), LocalStore(Path("/srv/s"))
    ]


def test_labels_never_show_credentials() -> None:
    (http, local) = parse_stores(["https://h/s/", "file:///srv/s"])
    assert http.label == "https://h/s/"
    assert local.label == "file:///srv/s"
    for name in ("https://user:secret@h/s/", "https://token@h/s/"):
        with pytest.raises(UsageError, match="credentials in a URL are visible") as caught:
            parse_stores([name])
        assert "secret" not in str(caught.value) and "token" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ftp://h/s",
         "--store ftp://h/s: unsupported scheme 'ftp' (use http, https, file, docker)"),
        ("/no/such/dir", "--store /no/such/dir: no such directory"),
        ("no-such-dir", "--store no-such-dir: no such directory"),
        ("http:///x", "--store http:///x: not a valid URL"),
        ("http://[::1/", "--store http://[::1/: not a valid URL"),
        ("file://otherhost/x", "--store file://otherhost/x: a file:// URL must name a local"
                               " path (file:///DIR)"),
        ("http://user:secret@h:99999/", "--store http://h:99999/: not a valid URL"),
    ],
)
def test_bad_names_are_one_line_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as caught:
        normalize_store(name)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_passwords_are_never_shown() -> None:
    for name in ("http://user:secret@[::1/", "gopher://user:secret@h/", "http://u:secret@/"):
        with pytest.raises(UsageError) as caught:
            parse_stores([name])
        assert "secret" not in str(caught.value)
