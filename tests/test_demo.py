"""``python -m procshare demo``: prints the right numbers and fails loudly when they are wrong."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procshare as ps
from procshare import _demo
from procshare._engine import inspect, names

ROOT = Path(__file__).resolve().parents[1]


def brute_force(processes: int) -> int:
    return sum(i * j - i + i**4 for i in range(processes) for j in range(1, 100))


@pytest.mark.parametrize("processes", [1, 2, 3, 10, 57, 100, 101, 1000])
def test_expected_sum_is_the_double_sum(processes: int) -> None:
    assert _demo.expected_sum(processes) == brute_force(processes)


def test_expected_sum_of_the_seed_scenario() -> None:
    # The one number the whole project is about (SPEC.md, top).
    assert _demo.expected_sum(100) == 193107012120


def test_max_processes_is_the_last_count_whose_sum_fits_a_u64() -> None:
    limit = _demo.max_processes()
    assert _demo.expected_sum(limit) < 2**64 <= _demo.expected_sum(limit + 1)


@pytest.mark.timeout(120)
def test_demo_runs_repeats_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo.main(["--processes", "20", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    expected = brute_force(20)
    runs = re.findall(
        rf"^run (\d): sum {expected}  expected {expected}  wall \S+ s  ok$", out, re.M
    )
    assert runs == ["1", "2", "3"], out
    assert "nothing left in shared memory" in out
    assert "wall time over 3 runs: median" in out
    assert f"ok: all 3 run(s) summed to {expected}" in out


@pytest.mark.timeout(120)
def test_python_m_procshare_demo_defaults_to_the_seed_scenario() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "procshare", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "100 forked processes; child i adds i*j - i + i**4 for j in 1..99" in done.stdout
    assert "expected sum: 193107012120 (from the formula)" in done.stdout
    assert "run 1: sum 193107012120  expected 193107012120" in done.stdout
    assert "nothing left in shared memory" in done.stdout


@pytest.mark.timeout(120)
def test_a_wrong_sum_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Expect one more than the truth: the (correct) total must now be reported wrong.
    real = _demo.expected_sum
    monkeypatch.setattr(_demo, "expected_sum", lambda n: real(n) + 1)
    assert _demo.main(["--processes", "5"]) == 1
    out = capsys.readouterr().out
    assert f"sum {real(5)}  expected {real(5) + 1}" in out
    assert "WRONG" in out
    assert "FAILED: 1 problem(s)" in out
    assert "updates were lost or doubled" in out


@pytest.mark.timeout(120)
def test_a_leftover_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[str] = []
    real = _demo.scenario

    def leaky(processes: int, *, paced: bool = False) -> int:
        # A persistent segment outlives the run: exactly what the check must catch.
        seen.append(names.current_namespace())
        with ps.shared("stray", ps.u64, persist=True):
            pass
        return real(processes, paced=paced)

    monkeypatch.setattr(_demo, "scenario", leaky)
    try:
        assert _demo.main(["--processes", "3"]) == 1
        out = capsys.readouterr().out
        stray = names.os_name(names.SEGMENT, "stray", seen[0])
        assert f"LEFT IN SHARED MEMORY: {stray}" in out
        assert "left 1 object(s) in shared memory" in out
    finally:
        for namespace in seen:
            with ps.namespace(namespace):
                ps.unlink("stray")
    assert all(not inspect.namespace_objects(ns) for ns in seen)


@pytest.mark.timeout(120)
def test_a_failing_child_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @ps.forked
    def broken(i: int) -> None:
        if i == 2:
            raise ArithmeticError(f"child {i} gave up")
        with ps.shared("sum", ps.u64) as s, ps.interprocess_lock("m"):
            for j in range(1, 100):
                s.value += i * j - i + i**4

    monkeypatch.setattr(_demo, "job", broken)
    assert _demo.main(["--processes", "4"]) == 1
    out = capsys.readouterr().out
    assert "run 1: sum failed" in out
    assert "child 2 gave up" in out


@pytest.mark.timeout(120)
def test_sleep_reproduces_the_pauses_and_states_the_wall_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _demo.main(["--processes", "3", "--sleep"]) == 0
    out = capsys.readouterr().out
    assert "expect at least 1.3 s a run\n    (1 s + 3 x 100 ms)" in out
    wall = float(re.search(r"wall (\S+) s \(>= 1.3 s\)  ok", out).group(1))  # type: ignore[union-attr]
    assert wall >= 1.3


def test_a_paced_run_faster_than_the_pauses_allow_is_an_overlap() -> None:
    run = _demo.Run(1, total=10, expected=10, wall=0.5, left=frozenset())
    assert run.problems(paced=False, processes=3) == []
    [problem] = run.problems(paced=True, processes=3)
    assert "the locked sections overlapped" in problem


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "must be at least 1, got 0"),
        (["--repeat", "-2"], "must be at least 1, got -2"),
        (["--processes", "many"], "'many' is not a whole number"),
        (["--processes", "100000"], "would overflow the shared u64"),
    ],
)
def test_bad_arguments_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _demo.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def interrupt_demo(after_header: float, signum: int = signal.SIGINT) -> tuple[int, str]:
    """Run ``demo --processes 5 --sleep``, Ctrl-C it (or send ``signum``)
    ``after_header`` s into the run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "procshare", "demo", "--processes", "5", "--sleep"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:  # the header ends with a blank line, then the run starts
            lines.append(line)
            if not line.strip():
                break
        time.sleep(after_header)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + rest


@pytest.mark.timeout(120)
def test_ctrl_c_during_the_pause_stops_cleanly() -> None:
    # The children are in their 1 s pause: nobody holds the lock.
    code, out = interrupt_demo(0.3)
    assert code == 130, out
    assert "interrupted during run 1" in out
    assert "nothing left in shared memory" in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [0.3, 1.2])
def test_sigterm_stops_it_as_ctrl_c_does_and_leaves_nothing(after: float) -> None:
    # kill, timeout, a service manager: Python's default would end the process
    # at once and leave the run's segment in a namespace nobody opens again.
    code, out = interrupt_demo(after, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    assert "terminated (SIGTERM) during run 1" in out
    assert "nothing left in shared memory" in out or (
        "a lock whose holder was killed is kept" in out and "removed 1 object(s)" in out
    ), out


@pytest.mark.timeout(120)
def test_ctrl_c_while_a_child_holds_the_lock_leaves_nothing_either() -> None:
    # 1.2 s in, the five 100 ms locked sections are under way: the child holding
    # the lock is terminated, and its lock is kept on purpose (OwnerDied for the
    # next user). The demo says so and removes it, since its namespace is its own.
    # If the signal falls between two sections, nothing is left at all. Either
    # way the leak check of this test finds /dev/shm as it was.
    code, out = interrupt_demo(1.2)
    assert code == 130, out
    assert "interrupted during run 1" in out
    assert "nothing left in shared memory" in out or (
        "a lock whose holder was killed is kept" in out and "removed 1 object(s)" in out
    ), out
