"""Owner-only files and directories, and token files: the one implementation every process uses."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from common.privatefs import (
    PrivateFileExists,
    PrivatePathError,
    create_private_file,
    private_dir,
    read_private_file,
    replace_private_file,
)
from common.tokenfile import MAX_TOKEN_BYTES, TokenFileError, read_token, token_from


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- directories ---------------------------------------------------------------------------------

def test_a_private_dir_is_created_0700_with_its_parents(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b"
    assert mode(made) == 0o700


def test_an_existing_dir_others_can_read_is_tightened(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    wide.chmod(0o755)
    private_dir(wide)
    assert mode(wide) == 0o700


def test_a_link_in_place_of_a_private_dir_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "state").symlink_to(target)
    with pytest.raises(PrivatePathError, match="is not a directory"):
        private_dir(tmp_path / "state")


def test_a_private_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PrivatePathError, match="belongs to another user"):
        private_dir(theirs)


# --- files ---------------------------------------------------------------------------------------

def test_a_private_file_is_created_with_its_mode_and_content(tmp_path: Path) -> None:
    create_private_file(tmp_path / "secret", b"s3cret")
    create_private_file(tmp_path / "job.sh", b"#!/bin/sh\n", mode=0o700)
    assert (tmp_path / "secret").read_bytes() == b"s3cret"
    assert (mode(tmp_path / "secret"), mode(tmp_path / "job.sh")) == (0o600, 0o700)


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    existing = tmp_path / "token"
    existing.write_text("keep me")
    with pytest.raises(PrivateFileExists, match="exists; refusing to overwrite it"):
        create_private_file(existing, b"new")
    assert existing.read_text() == "keep me"


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "token").symlink_to(victim)
    with pytest.raises(PrivateFileExists):
        create_private_file(tmp_path / "token", b"new")
    assert victim.read_text() == "untouched"


def test_replacing_a_private_file_leaves_no_temporary_behind(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    create_private_file(path, b"old")
    replace_private_file(path, b"new")
    assert (path.read_bytes(), mode(path)) == (b"new", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def shared_file(path: Path) -> None:
    path.write_text("x")
    path.chmod(0o644)


def large_file(path: Path) -> None:
    create_private_file(path, b"x" * 65)


@pytest.mark.parametrize(("setup", "message"), [
    (shared_file, "readable by others (mode 0644); chmod 600 it"),
    (Path.mkdir, "is not a regular file"),
    (large_file, "is 65 bytes, more than the 64"),
])
def test_reading_a_private_file_checks_type_mode_and_size(
        tmp_path: Path, setup: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "f"
    setup(path)
    with pytest.raises(PrivatePathError, match=re.escape(message)):
        read_private_file(path, max_bytes=64)


def test_a_fifo_in_place_of_a_file_does_not_hang_the_reader(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "token", 0o600)
    with pytest.raises(PrivatePathError, match="is not a regular file"):
        read_private_file(tmp_path / "token", max_bytes=64)


def test_reading_through_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    create_private_file(real, b"t")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PrivatePathError, match="symbolic link"):
        read_private_file(tmp_path / "link", max_bytes=64)


# --- token files ---------------------------------------------------------------------------------

def test_a_private_token_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "token"
    create_private_file(path, b"abc.def.ghi\n")
    assert read_token(path) == "abc.def.ghi"


@pytest.mark.parametrize(("content", "file_mode", "message"), [
    ("abc", 0o640, "readable by others (mode 0640); chmod 600 it"),
    ("abc", 0o604, "readable by others (mode 0604)"),
    ("", 0o600, "does not hold one token"),
    ("two tokens", 0o600, "does not hold one token"),
    ("x" * (MAX_TOKEN_BYTES + 1), 0o600, f"more than the {MAX_TOKEN_BYTES}"),
])
def test_a_shared_or_malformed_token_file_is_refused(tmp_path: Path, content: str,
                                                     file_mode: int, message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(file_mode)
    with pytest.raises(TokenFileError, match=re.escape(message)):
        read_token(path)


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=f"token file {tmp_path / 'nope'}: No such file"):
        read_token(tmp_path / "nope")


def test_a_token_comes_from_the_file_or_the_environment_else_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given, default = tmp_path / "given", tmp_path / "default"
    create_private_file(given, b"from-file")
    create_private_file(default, b"from-default")
    monkeypatch.delenv("DSN_TEST_TOKEN", raising=False)
    found = token_from(given, env="DSN_TEST_TOKEN", default=default)
    assert (found.token, found.source) == ("from-file", f"--token-file {given}")
    assert "from-file" not in repr(found)
    assert token_from(None, env="DSN_TEST_TOKEN", default=default).token == "from-default"
    monkeypatch.setenv("DSN_TEST_TOKEN", " from-env\n")
    found = token_from(None, env="DSN_TEST_TOKEN", default=default)
    assert (found.token, found.source) == ("from-env", "$DSN_TEST_TOKEN")
    monkeypatch.delenv("DSN_TEST_TOKEN")
    with pytest.raises(TokenFileError, match="does not exist .*set DSN_TEST_TOKEN"):
        token_from(None, env="DSN_TEST_TOKEN", default=tmp_path / "absent")


def test_a_token_file_and_the_environment_together_are_refused_naming_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "given"
    create_private_file(given, b"from-file")
    monkeypatch.setenv("DSN_TEST_TOKEN", "from-env")
    with pytest.raises(TokenFileError) as refused:
        token_from(given, env="DSN_TEST_TOKEN", default=tmp_path / "default")
    assert str(refused.value) == (f"two tokens given: --token-file {given} and $DSN_TEST_TOKEN; "
                                  "give one (unset DSN_TEST_TOKEN, or drop --token-file)")
    assert "from-" not in str(refused.value)


@pytest.mark.parametrize("value", ["two tokens", "x" * (MAX_TOKEN_BYTES + 1), "a\x07b"])
def test_an_environment_variable_not_holding_one_token_is_refused(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DSN_TEST_TOKEN", value)
    with pytest.raises(TokenFileError, match=r"^\$DSN_TEST_TOKEN (does not hold one|holds more)"):
        token_from(None, env="DSN_TEST_TOKEN")
