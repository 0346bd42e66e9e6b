"""The interleaving explorer (tests/explorer.py) itself: it finds a known race, proves a known
safe protocol, really crashes actors, counts schedules exactly, and skews clocks."""

from __future__ import annotations

from typing import Any

import pytest

from explorer import START_TIME, Actor, Advance, State, World, explore, replay
from omniq.core.fs import Op, Program, create, listdir, now, read, write

KINDS = ["memory", "local"]


@pytest.fixture(autouse=True)
def _engine_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests count schedules exactly: the knobs meant for the queue's scenarios
    # ("run many more", "replay one") would change what they count.
    monkeypatch.delenv("OMNIQ_EXPLORE_SAMPLES", raising=False)
    monkeypatch.delenv("OMNIQ_EXPLORE_REPLAY", raising=False)


def _put(key: str, data: bytes) -> Program[None]:
    yield write(key, data)


def _get(world: World, key: str) -> bytes | None:
    def program() -> Program[bytes | None]:
        data: bytes | None = yield read(key)
        return data

    return world.run(program())


# -- (a) lost update: read-then-write increments race -----------------------------------------


def _increment(world: World) -> Program[None]:
    value = yield read("n")
    assert value is not None
    yield write("n", str(int(value) + 1).encode())


def _counter(kind: str, tmp_path: Any, **kwargs: Any) -> Any:
    def final(world: World, state: State) -> list[str]:
        got = _get(world, "n")
        return [] if got == b"2" else [f"n is {got!r} after two increments, expected b'2'"]

    return explore(
        "control lost-update",
        [Actor("A", _increment), Actor("B", _increment)],
        kind=kind,
        base_dir=tmp_path,
        setup=lambda world: world.run(_put("n", b"0")),
        final=final,
        **kwargs,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_exhaustive_finds_the_lost_update(kind: str, tmp_path: Any) -> None:
    report = _counter(kind, tmp_path, mode="exhaustive", max_violations=10)
    # 2 + 2 steps: C(4, 2) = 6 orders; the 4 that interleave the reads lose an update.
    assert (report.mode, report.complete, report.schedules, report.steps) == (
        "exhaustive", True, 6, 24,
    )  # fmt: skip
    assert {",".join(v.path) for v in report.violations} == {
        "A,B,A,B", "A,B,B,A", "B,A,A,B", "B,A,B,A",
    }  # fmt: skip
    first = report.violations[0]
    assert first.messages == ["final: n is b'1' after two increments, expected b'2'"]
    assert [e.op.name if e.op else None for e in first.trace] == ["read", "read", "write", "write"]
    # The path replays to the same violation, and assert_clean shows how.
    again = replay(first.token, "control lost-update", [Actor("A", _increment), Actor("B", _increment)],
                   kind=kind, base_dir=tmp_path, setup=lambda w: w.run(_put("n", b"0")),
                   final=lambda w, s: [] if _get(w, "n") == b"2" else ["lost"])  # fmt: skip
    assert again.schedules == 1 and again.violations[0].path == first.path
    with pytest.raises(
        AssertionError, match=r"(?s)OMNIQ_EXPLORE_REPLAY='control lost-update/.*@A,B,"
    ):
        report.assert_clean()


@pytest.mark.parametrize("kind", KINDS)
def test_random_finds_the_lost_update_and_its_seed_replays(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _counter(kind, tmp_path, mode="random", samples=200)
    assert report.mode == "random" and len(report.violations) == 1
    found = report.violations[0]
    assert found.seed is not None and 1 <= report.schedules <= 200
    again = _counter(kind, tmp_path, replay=found.seed)
    assert (again.mode, again.schedules) == ("replay", 1)
    assert again.violations[0].messages == found.messages
    assert [str(e) for e in again.violations[0].trace] == [str(e) for e in found.trace]
    # The same through the environment, as printed in the failure message.
    monkeypatch.setenv("OMNIQ_EXPLORE_REPLAY", f"control lost-update/{kind}@{found.token}")
    assert [str(e) for e in _counter(kind, tmp_path).violations[0].trace] == [
        str(e) for e in found.trace
    ]
    # Same master seed, same schedules: CI is deterministic.
    monkeypatch.delenv("OMNIQ_EXPLORE_REPLAY")
    assert _counter(kind, tmp_path, mode="random", samples=200).violations[0].seed == found.seed


def test_per_step_check_stops_the_schedule_at_the_violating_step() -> None:
    def check(world: World, state: State) -> list[str]:
        return ["n was written"] if _get(world, "n") != b"0" else []

    report = explore(
        "control stop-early",
        [Actor("A", _increment), Actor("B", _increment)],
        setup=lambda world: world.run(_put("n", b"0")),
        check=check,
    )
    violation = report.violations[0]  # the first DFS schedule: A, A
    assert violation.path == ("A", "A") and violation.messages == ["after choice 2: n was written"]
    assert violation.statuses == {"A": "finished(None)", "B": "running"}


# -- (b) exclusive create: exactly one winner --------------------------------------------------


def _claimer(name: str) -> Any:
    def program(world: World) -> Program[bool]:
        won = yield create("lock", name.encode())
        if won:
            world.obj.append(name)  # the in-memory record of the objects under test
            yield write("winner", name.encode())
        return bool(won)

    return program


@pytest.mark.parametrize("kind", KINDS)
def test_exclusive_create_has_exactly_one_winner_in_every_schedule(
    kind: str, tmp_path: Any
) -> None:
    def check(world: World, state: State) -> list[str]:
        winners = [a.name for a in state.with_status("finished") if a.value]
        return [f"two winners {winners}"] if len(winners) > 1 or len(world.obj) > 1 else []

    def final(world: World, state: State) -> None:
        winners = [a.name for a in state.actors.values() if a.value]
        assert len(winners) == 1, f"winners: {winners}"
        assert world.obj == winners and _get(world, "winner") == winners[0].encode()

    report = explore(
        "one-winner",
        [Actor("A", _claimer("A")), Actor("B", _claimer("B")), Actor("C", _claimer("C"))],
        kind=kind,
        base_dir=tmp_path,
        make=lambda world: [],
        check=check,
        final=final,
    )
    report.assert_clean()
    # The first create wins (3 ways); the winner's write and the 2 other creates then
    # interleave in 3!/1 = 6 orders: 18 schedules.
    assert (report.mode, report.complete, report.schedules) == ("exhaustive", True, 18)


# -- (c) crashes, and exact schedule counts ---------------------------------------------------


def _writer(world: World) -> Program[str]:
    yield write("A", b"1")
    yield write("B", b"1")
    return "done"


def _reader(world: World) -> Program[bytes | None]:
    data: bytes | None = yield read("B")
    return data


@pytest.mark.parametrize("kind", KINDS)
def test_crashes_happen_and_exhaustive_counts_are_exact(kind: str, tmp_path: Any) -> None:
    seen: set[tuple[str, bool, bool]] = set()

    def final(world: World, state: State) -> None:
        w = state["W"]
        seen.add((w.status, _get(world, "A") is not None, _get(world, "B") is not None))
        assert w.status != "finished" or w.value == "done"

    actors = [Actor("W", _writer, crashable=True), Actor("R", _reader)]
    report = explore("crash-count", actors, kind=kind, base_dir=tmp_path, final=final)
    # W runs as "W!" (crashed after A), "W,W" or "W,W!" (crashed after B, before returning);
    # R's one step goes anywhere around them: 2 + 3 + 3 = 8 schedules, 2*2 + 6*3 = 22 steps.
    assert (report.mode, report.schedules, report.steps) == ("exhaustive", 8, 22)
    assert seen == {("crashed", True, False), ("crashed", True, True), ("finished", True, True)}
    report.assert_clean()

    no_crash = explore("crash-count", actors, kind=kind, base_dir=tmp_path, max_crashes=0)
    assert no_crash.schedules == 3  # C(3, 1)
    # One optional advance before any of the L steps of each of the 8 schedules (or none):
    # 2 schedules of 2 steps give 3 each, 6 of 3 steps give 4 each: 30.
    timed = explore("crash-count", actors, kind=kind, base_dir=tmp_path, advances=[Advance(5)])
    assert timed.schedules == 30
    capped = explore("crash-count", actors, kind=kind, base_dir=tmp_path, mode="exhaustive",
                     advances=[5, 60], max_schedules=10)  # fmt: skip
    assert (capped.mode, capped.complete, capped.schedules) == ("exhaustive-partial", False, 10)
    auto = explore("crash-count", actors, kind=kind, base_dir=tmp_path, advances=[5, 60],
                   max_schedules=10, samples=40)  # fmt: skip
    assert (auto.mode, auto.schedules) == ("random", 50)


def test_a_crashed_actor_runs_no_code_until_the_schedule_ends() -> None:
    log: list[str] = []

    def careful(world: World) -> Program[None]:
        try:
            yield write("A", b"1")
            log.append("after A")
            yield write("B", b"1")
        finally:
            log.append("finally")

    def check(world: World, state: State) -> None:
        if state["W"].status == "crashed":
            assert log == [], log

    report = explore("crash-quiet", [Actor("W", careful, crashable=True)], check=check,
                     replay="W!")  # fmt: skip
    report.assert_clean()
    assert log == ["finally"]  # closed only after the schedule


def test_storage_errors_and_exceptions_are_results() -> None:
    def prober(world: World) -> Program[str]:
        try:
            yield Op("no_such_op", ())
        except Exception:  # an op's failure is thrown into the program (as a StorageError)
            pass
        raise KeyError("gone")

    report = explore("control raise", [Actor("P", prober)], check=lambda w, s: None)
    report.assert_clean()
    failing = explore("control raise", [Actor("P", prober)],
                      final=lambda w, s: [f"P is {s['P'].status}: {s['P'].error!r}"])  # fmt: skip
    assert failing.violations[0].messages == ["final: P is raised: KeyError('gone')"]


# -- (d) clock skew ----------------------------------------------------------------------------


def _clock(world: World) -> Program[float]:
    t: float = yield now()
    return t


@pytest.mark.parametrize("kind", KINDS)
def test_skewed_actor_sees_world_time_plus_its_skew(kind: str, tmp_path: Any) -> None:
    seen: set[float] = set()

    def final(world: World, state: State) -> None:
        for event in state.trace:
            if event.actor:
                skew = {"A": 0.0, "B": 5.0}[event.actor]
                assert state[event.actor].value == event.t + skew
                seen.add(state[event.actor].value - START_TIME)
        assert world.run(_clock(world), skew=3) == world.t + 3

    actors = [Actor("A", _clock), Actor("B", _clock, skew=5)]
    report = explore("skew", actors, kind=kind, base_dir=tmp_path, final=final, advances=[10])
    report.assert_clean()
    assert seen == {0.0, 5.0, 10.0, 15.0}


@pytest.mark.parametrize("kind", KINDS)
def test_files_written_carry_the_logical_time(kind: str, tmp_path: Any) -> None:
    def writer(world: World) -> Program[None]:
        yield write("q/a", b"1")
        yield create("q/b", b"1")

    def final(world: World, state: State) -> None:
        def listing() -> Program[list[Any]]:
            entries: list[Any] = yield listdir("q", detail=True)
            return entries

        times = [e.mtime - START_TIME for e in world.run(listing())]
        expected = [0.0, 0.0] if state.trace[0].actor else [30.0, 30.0]
        if state.trace[1].detail.startswith("advance"):
            expected[1] = 30.0
        assert times == expected, (times, expected)

    report = explore("mtimes", [Actor("W", writer, skew=7)], kind=kind, base_dir=tmp_path,
                     final=final, advances=[30])  # fmt: skip
    report.assert_clean()
    assert report.schedules == 3
