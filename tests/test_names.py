"""Names, namespaces and the OS names they map to."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import procshare as ps
from procshare._engine import names

VALID = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-",
    min_size=1,
    max_size=128,
)


@given(VALID)
def test_valid_names_map_to_short_distinct_os_names(name: str) -> None:
    assert names.validate_name(name) == name
    os_name = names.os_name(names.SEGMENT, name)
    assert len(os_name) <= 31
    assert os_name.startswith("/ps")
    assert "/" not in os_name[1:]
    assert os_name != names.os_name(names.LOCK, name)


@given(st.text(min_size=1, max_size=40).filter(lambda s: not names._NAME_RE.fullmatch(s)))
def test_invalid_names_are_refused_with_what_is_allowed(name: str) -> None:
    with pytest.raises(ps.InvalidName) as info:
        names.validate_name(name)
    assert "A-Z a-z 0-9 . _ -" in str(info.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("x" * 129, "129 characters"),
        ("a/b", "'/'"),
        ("sum total", "' '"),
        ("naïve", "'ï'"),
    ],
)
def test_invalid_name_messages_say_why(name: str, why: str) -> None:
    with pytest.raises(ps.InvalidName, match=why):
        names.validate_name(name)


def test_non_string_name() -> None:
    with pytest.raises(ps.InvalidName, match="must be a str"):
        names.validate_name(42)


def test_namespaces_separate_the_same_name() -> None:
    base = names.os_name(names.SEGMENT, "sum")
    with ps.namespace("app"):
        assert names.current_namespace() == "app"
        inner = names.os_name(names.SEGMENT, "sum")
        with ps.namespace("other"):
            assert names.os_name(names.SEGMENT, "sum") not in {base, inner}
        assert names.current_namespace() == "app"
    assert inner != base
    assert names.os_name(names.SEGMENT, "sum") == base


def test_namespace_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCSHARE_NAMESPACE", "envapp")
    assert names.current_namespace() == "envapp"
    with ps.namespace("inner"):
        assert names.current_namespace() == "inner"
    monkeypatch.setenv("PROCSHARE_NAMESPACE", "bad name")
    with pytest.raises(ps.InvalidName, match="PROCSHARE_NAMESPACE"):
        names.current_namespace()


def test_invalid_namespace_is_refused() -> None:
    with pytest.raises(ps.InvalidName), ps.namespace("no/slashes"):
        pass


def test_users_are_separated() -> None:
    me = names.namespace_prefix("app", uid=os.geteuid())
    other = names.namespace_prefix("app", uid=os.geteuid() + 1)
    assert me != other


def test_temp_names_share_the_namespace_prefix() -> None:
    tmp = names.temp_os_name()
    assert tmp.startswith(names.namespace_prefix())
    assert len(tmp) == 31
    assert tmp != names.temp_os_name()


def test_os_names_never_change_between_versions() -> None:
    # Objects outlive processes (persist=True, a kept lock): a new version of
    # procshare must derive the same OS names, or it would not find them.
    assert names.os_name("l", "m", "ns1", 1000) == "/ps8343ddflf2d5a9c9ac73dde16294"
    assert names.os_name("s", "sum", "default", 0) == "/ps1c98974sb2e6008119ce9c2e850a"


def _os_name_by_hashlib(kind: str, name: str, namespace: str, uid: int) -> str:
    """The OS-name definition (names.py), written with hashlib: what the C must match."""
    import hashlib

    prefix = hashlib.blake2b(f"{uid}\0{namespace}".encode(), digest_size=8).digest().hex()[:7]
    tail = hashlib.blake2b(f"{namespace}\0{kind}\0{name}".encode(), digest_size=10).hexdigest()
    return "/ps" + prefix + kind + tail


@given(VALID, VALID, st.sampled_from(["s", "l", "y"]), st.integers(0, 2**32 - 1))
def test_the_c_os_names_are_the_definitions(name: str, ns: str, kind: str, uid: int) -> None:
    assert names.os_name(kind, name, ns, uid) == _os_name_by_hashlib(kind, name, ns, uid)
    assert names.namespace_prefix(ns, uid) == _os_name_by_hashlib(kind, name, ns, uid)[:10]


@given(st.binary(max_size=600), st.sampled_from([1, 7, 8, 10, 32, 63, 64]))
def test_the_c_blake2b_is_hashlibs(data: bytes, size: int) -> None:
    import hashlib

    from procshare._engine import _cengine

    # Several 128-byte blocks, and the exact block boundary, included.
    assert _cengine.blake2b_hex(data, size) == hashlib.blake2b(data, digest_size=size).hexdigest()


@given(st.text(max_size=140) | VALID)
def test_the_c_name_check_agrees_with_the_rule(text: str) -> None:
    from procshare._engine import _cengine

    assert _cengine.valid(text) == bool(names._NAME_RE.fullmatch(text))


def test_the_c_name_check_refuses_what_is_not_a_plain_str() -> None:
    from procshare._engine import _cengine

    class Name(str):
        pass

    assert not _cengine.valid(Name("m"))  # (validate_name's Python path takes it)
    assert names.validate_name(Name("m")) == "m"
    assert not _cengine.valid(b"m")
    assert not _cengine.valid(None)
    with pytest.raises(ValueError, match="one character"):
        names.os_name("ls", "m", "default", 0)
