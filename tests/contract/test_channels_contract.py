"""The channel half of the backend contract (``api_channel.py``): what pools rely on.

A socket pair whose near end is non-blocking and private (children forked
later close it), a far end a worker forked next inherits, readiness in both
directions, end of file when the peer goes, and a board of integers shared
with children forked after it.
"""

from __future__ import annotations

import os

import pytest

from procshare._backends import Backend, get_backend


@pytest.fixture(params=["posix"])
def backend(request: pytest.FixtureRequest) -> Backend:
    assert request.param == get_backend().name
    return get_backend()


def _reap(backend: Backend, pid: int, result_fd: int, wait_fd: int | None) -> int | None:
    exit_ = backend.process_reap(pid, block=True)
    backend.process_close(result_fd)
    if wait_fd is not None:
        backend.process_close(wait_fd)
    assert exit_ is not None
    return exit_.status


def test_a_pair_carries_bytes_both_ways_and_ends_with_eof(backend: Backend) -> None:
    near, far = backend.channel_pair()
    try:
        assert backend.channel_recv(near) is None  # non-blocking: nothing yet
        assert backend.channel_send(near, memoryview(b"ping")) == 4
        assert backend.channel_read(far, 100) == b"ping"
        backend.process_write(far, b"pong")
        readable, _ = backend.channel_wait([near], [], 5)
        assert readable == [near]
        assert backend.channel_recv(near) == b"pong"
        _, writable = backend.channel_wait([], [near], 5)
        assert writable == [near]
        # A full buffer takes nothing more, without blocking.
        sent = 0
        while (n := backend.channel_send(near, memoryview(b"x" * 65536))) > 0:
            sent += n
        assert sent > 0
        assert backend.channel_wait([], [near], 0) == ([], [])
    finally:
        backend.process_close(far)
    assert backend.channel_recv(near) == b""  # the peer is gone: end of file
    backend.process_close(near)


def test_children_forked_later_close_the_near_end_but_get_the_far_end(
    backend: Backend,
) -> None:
    near, far = backend.channel_pair()

    def child(result_fd: int) -> int:
        try:
            os.fstat(near)
        except OSError:
            closed = True
        else:
            closed = False
        backend.process_write(far, b"far ok")
        return 0 if closed else 3

    try:
        pid, result_fd, wait_fd = backend.process_fork(child)
        backend.process_close(far)
        assert _reap(backend, pid, result_fd, wait_fd) == 0
        readable, _ = backend.channel_wait([near], [], 5)
        assert readable == [near]
        assert backend.channel_recv(near) == b"far ok"
    finally:
        backend.process_close(near)


def test_keep_private_makes_later_children_close_a_descriptor(backend: Backend) -> None:
    near, far = backend.channel_pair()
    backend.channel_keep_private(far)

    def child(result_fd: int) -> int:
        try:
            os.fstat(far)
        except OSError:
            return 0
        return 3

    try:
        pid, result_fd, wait_fd = backend.process_fork(child)
        assert _reap(backend, pid, result_fd, wait_fd) == 0
    finally:
        backend.process_close(far)
        backend.process_close(near)


def test_a_board_is_shared_with_children_forked_after_it(backend: Backend) -> None:
    board = backend.channel_board(2)
    board[0] = 7

    def child(result_fd: int) -> int:
        board[1] = board[0] * 6
        return 0

    pid, result_fd, wait_fd = backend.process_fork(child)
    assert _reap(backend, pid, result_fd, wait_fd) == 0
    assert board[1] == 42
