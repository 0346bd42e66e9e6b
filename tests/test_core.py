"""omniq-core: the JSON codec, names, models, errors and the fsspec ``Store``."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio.to_thread
import fsspec
import pytest

import omniq.core
from omniq.core import codec, errors, models
from omniq.core.errors import (
    InvalidNameError,
    MissingDependencyError,
    OmniQError,
    SerializationError,
    StorageError,
)
from omniq.core.fs import Store, listdir
from omniq.core.models import (
    EventType,
    ResultStatus,
    Task,
    TaskEvent,
    TaskResult,
    id_text,
    new_id,
)
from omniq.core.names import MAX_NAME_LENGTH, validate_key, validate_name

pytestmark = pytest.mark.timeout(60)

SRC_DIR = str(Path(omniq.core.__file__).resolve().parents[2])  # .../omniq-core/src
CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
UTC = timezone.utc


# =========================================================================== codec


def roundtrip(task: Task) -> Task:
    return codec.decode(codec.encode(task), Task)


def test_codec_user_dicts_that_look_like_markers_stay_dicts() -> None:
    tricky = {
        "status": "done",
        "__type__": "datetime",
        "v": 99,
        "func": "x:y",
        "id": 1,
        "$ref": "#",
        "": "empty key",
    }
    task = Task(
        func="pkg.mod:fn",
        args=[tricky, [tricky]],
        kwargs={"status": tricky},
        metadata={"v": {"__type__": "set"}},
    )
    back = roundtrip(task)
    assert back == task
    assert back.args[0] == tricky and type(back.args[0]) is dict
    assert back.kwargs == {"status": tricky}
    assert back.metadata == {"v": {"__type__": "set"}}
    assert back.v == models.SCHEMA_VERSION

    result = TaskResult(task_id=task.id, status=ResultStatus.SUCCESS, value=tricky)
    assert codec.decode(codec.encode(result), TaskResult).value == tricky
    event = TaskEvent(task_id=task.id, type=EventType.ENQUEUED, data={"status": tricky})
    assert codec.decode(codec.encode(event), TaskEvent).data == {"status": tricky}


@pytest.mark.parametrize(
    "value",
    [
        [[1, [2, [3, []]]], {"a": [{"b": []}]}],
        [-(2**63), 2**63 - 1, 2**63, 2**64 - 1, 0, -1],
        [
            "",
            "héllo",
            "日本語",
            "🚀 emoji",
            "\u2028\u2029",
            "nul\x00byte",
            "tab\tnew\nline",
            '"quotes" \\ back',
        ],
        [0.1, -0.0, 1.5e-300, 5e-324, 1.7976931348623157e308, -2.5, 1e16, 3.0],
        [True, False, None, 1, 1.0, "1"],
        {"nested": {"deeper": {"deepest": [None, {"x": 1}]}}},
    ],
    ids=["nested", "ints-64bit-edges", "unicode", "floats", "scalars", "dict"],
)
def test_codec_roundtrips_exactly(value: object) -> None:
    task = Task(func="pkg.mod:fn", args=[value], kwargs={"k": value})
    back = roundtrip(task)
    assert back.args == [value] and back.kwargs == {"k": value}
    assert repr(back.args) == repr([value])  # same types: True stays True, 1.0 stays float
    if isinstance(value, list) and isinstance(value[0], float):
        assert [math.copysign(1, x) for x in back.args[0]] == [
            math.copysign(1, x) for x in value
        ]  # -0.0 keeps its sign
    assert codec.loads(codec.dumps(value)) == value


def test_codec_tuples_come_back_as_lists() -> None:
    task = Task(func="pkg.mod:fn", args=(1, (2, 3)), kwargs={"t": (4, [5, (6,)])})  # type: ignore[arg-type]
    back = roundtrip(task)
    assert back.args == [1, [2, 3]]
    assert back.kwargs == {"t": [4, [5, [6]]]}
    assert type(back.args) is list and type(back.args[1]) is list


class Custom:
    pass


@pytest.mark.parametrize(
    ("bad", "type_text"),
    [
        (datetime(2024, 1, 1, tzinfo=UTC), "datetime.datetime"),
        (b"raw", "bytes"),
        (bytearray(b"raw"), "bytearray"),
        ({1, 2}, "set"),
        (frozenset({1}), "frozenset"),
        (Custom(), "Custom"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (2**64, "18446744073709551616"),
        (-(2**63) - 1, "-9223372036854775809"),
        ({1: "int key"}, "int"),
        ({("t",): "tuple key"}, "tuple"),
        ({None: "none key"}, "NoneType"),
        (1 + 2j, "complex"),
        (Path("/tmp"), "Path"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else None,
)
def test_codec_refuses_what_json_cannot_carry(bad: object, type_text: str) -> None:
    for where, task in (
        ("args[1]", lambda: Task(func="m:f", args=[0, bad])),
        (
            "kwargs['outer'][0]['inner']",
            lambda: Task(func="m:f", kwargs={"outer": [{"inner": bad}]}),
        ),
        ("metadata['m']", lambda: Task(func="m:f", metadata={"m": bad})),
    ):
        with pytest.raises(SerializationError) as info:
            codec.encode(task())
        message = str(info.value)
        assert where in message, message
        assert type_text in message, message
    with pytest.raises(SerializationError, match=r"result value\[0\]"):
        codec.encode(TaskResult(task_id="t", status=ResultStatus.SUCCESS, value=[bad]))
    with pytest.raises(SerializationError, match=r"event data\['d'\]"):
        codec.encode(TaskEvent(task_id="t", type=EventType.ENQUEUED, data={"d": bad}))
    with pytest.raises(SerializationError):
        codec.dumps({"x": bad})
    assert issubclass(SerializationError, TypeError)


def test_codec_refuses_lone_surrogates() -> None:
    with pytest.raises(SerializationError):
        codec.encode(Task(func="m:f", args=["\ud800"]))


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_codec_nesting_limit() -> None:
    ok = _nested(codec.MAX_DEPTH)  # MAX_DEPTH levels of lists
    codec.check_json_value(ok)
    with pytest.raises(SerializationError, match=f"deeper than {codec.MAX_DEPTH}"):
        codec.check_json_value(_nested(codec.MAX_DEPTH + 1))
    with pytest.raises(SerializationError, match=f"deeper than {codec.MAX_DEPTH}"):
        codec.encode(Task(func="m:f", kwargs={"deep": _nested(codec.MAX_DEPTH + 5)}))
    # absurd depth is refused without a RecursionError
    with pytest.raises(SerializationError):
        codec.dumps(_nested(200_000))
    deep_dict: dict = {}
    for _ in range(codec.MAX_DEPTH + 1):
        deep_dict = {"d": deep_dict}
    with pytest.raises(SerializationError):
        codec.dumps(deep_dict)


def test_codec_document_size_limit() -> None:
    limit = codec.MAX_DOCUMENT_BYTES
    with pytest.raises(SerializationError) as info:
        codec.encode(Task(func="m:f", args=["x" * limit]))
    assert str(limit) in str(info.value)
    small = Task(func="m:f", args=["x" * (limit // 2)])
    assert len(codec.encode(small)) < limit
    with pytest.raises(SerializationError, match=str(limit)):
        codec.encode(TaskResult(task_id="t", status=ResultStatus.SUCCESS, value="y" * limit))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"{",
        b"[]",
        b"null",
        b'{"func": 5}',
        b'{"args": []}',
        b'{"v": 99, "func": "m:f"}',
        b'{"v": 0, "func": "m:f"}',
        b'{"func": "m:f", "created_at": "2024-01-01T00:00:00"}',  # naive timestamp
        b'{"func": "m:f", "priority": 100000}',
        b'{"func": "m:f", "created_at": "not a date"}',
        b"\xff\xfe\x00",
    ],
)
def test_decode_rejects_bad_documents(data: bytes) -> None:
    with pytest.raises(SerializationError):
        codec.decode(data, Task)


def test_decode_truncated_and_future_version() -> None:
    good = codec.encode(Task(func="m:f", args=[1, 2, 3]))
    for cut in (1, 5, len(good) // 2, len(good) - 1):
        with pytest.raises(SerializationError):
            codec.decode(good[:cut], Task)
    future = good.replace(b'"v":1', b'"v":99')
    assert future != good
    with pytest.raises(SerializationError, match="99"):
        codec.decode(future, Task)
    for kind, doc in (
        (TaskResult, b'{"v":99,"task_id":"t","status":"success"}'),
        (TaskEvent, b'{"v":99,"task_id":"t","type":"enqueued"}'),
    ):
        with pytest.raises(SerializationError, match="99"):
            codec.decode(doc, kind)
    with pytest.raises(SerializationError):
        codec.loads(b"{nope")


def test_pickle_is_never_imported() -> None:
    # ``-S``: no site hooks (coverage's .pth imports pickle); this process's path instead.
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {[SRC_DIR, *[p for p in sys.path if p]]!r}
        before = {{m for m in sys.modules if "pickle" in m}}
        import omniq.core, omniq.core.codec, omniq.core.fs, omniq.core.sync
        print(sorted({{m for m in sys.modules if "pickle" in m}} - before), bool(before))
    """)
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[] False", out.stdout
    source = Path(codec.__file__).read_text()
    assert "pickle" not in source.replace("Pickle is never used", "")


# =========================================================================== models


def test_ids_shape_and_uniqueness_tight_loop() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert all(len(i) == 26 and set(i) <= CROCKFORD for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # monotonic within the process
    tasks = [Task(func="m:f") for _ in range(100)]
    assert [t.id for t in tasks] == sorted(t.id for t in tasks)
    assert tasks[0].id > ids[-1]


def test_id_text_is_the_value_in_crockford_base32() -> None:
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    assert id_text(0) == "0" * 26
    assert id_text(2**128 - 1) == "7" + "Z" * 25
    rng = random.Random(7)
    for value in [1, 31, 32, 2**80, *(rng.getrandbits(128) for _ in range(2_000))]:
        text = id_text(value)
        assert (
            len(text) == 26
            and sum(digits.index(c) << 5 * (25 - i) for i, c in enumerate(text)) == value
        )


def test_new_id_is_the_millis_then_a_counter_in_crockford_base32(monkeypatch) -> None:
    """new_id's text is id_text of (millis << 80 | random part), the random part counting
    up within a millisecond, and the time part changes with the clock (it is cached)."""
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

    def value(text: str) -> int:
        return sum(digits.index(c) << 5 * (25 - i) for i, c in enumerate(text))

    monkeypatch.setattr(models, "_last_id", [-1, 0, ""])  # this test's sequence only
    now = [1_764_800_000_123_456_789]
    monkeypatch.setattr(models.time, "time_ns", lambda: now[0])
    first = [new_id() for _ in range(3)]
    ms = now[0] // 1_000_000
    values = [value(text) for text in first]
    assert [v >> 80 for v in values] == [ms] * 3
    assert values[1] == values[0] + 1 and values[2] == values[0] + 2
    assert [id_text(v) for v in values] == first
    now[0] += 1_000_000  # the next millisecond: a new time part and a new random part
    later = new_id()
    assert value(later) >> 80 == ms + 1 and later[:10] == id_text((ms + 1) << 80)[:10]
    assert later > first[-1]
    monkeypatch.setattr(models, "_last_id", [-1, 0, ""])
    monkeypatch.setattr(models.time, "time_ns", lambda: 0)  # millisecond 0: a full id too
    assert len(new_id()) == 26 and value(new_id()) >> 80 == 0


def test_ids_unique_and_monotonic_across_threads() -> None:
    per_thread: dict[int, list[str]] = {}
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait(10)
        per_thread[n] = [new_id() for _ in range(5_000)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(per_thread) == 8
    everything = [i for ids in per_thread.values() for i in ids]
    assert len(set(everything)) == 40_000
    for ids in per_thread.values():
        assert ids == sorted(ids)


def test_ids_sort_by_creation_time_and_survive_a_clock_step_back(monkeypatch) -> None:
    first = new_id()
    time.sleep(0.003)
    second = new_id()
    assert first < second and first[:10] < second[:10]  # the time part moved on

    real = time.time_ns
    monkeypatch.setattr(models.time, "time_ns", lambda: real() - 10 * 10**9)  # 10 s back
    stepped = [new_id() for _ in range(100)]
    monkeypatch.setattr(models.time, "time_ns", real)
    assert stepped == sorted(stepped) and stepped[0] > second
    assert new_id() > stepped[-1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_do_not_repeat_in_a_forked_child(monkeypatch) -> None:
    frozen = time.time_ns()
    monkeypatch.setattr(models.time, "time_ns", lambda: frozen)  # same millisecond everywhere
    new_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, "".join(new_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent_ids = {new_id() for _ in range(3)}
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    os.waitpid(pid, 0)
    child_ids = {data[i : i + 26] for i in range(0, len(data), 26)}
    assert len(child_ids) == 3
    assert not parent_ids & child_ids, "parent and forked child made the same task id"


def test_timestamps_are_utc_and_naive_is_refused() -> None:
    task = Task(func="m:f")
    assert task.created_at.tzinfo is not None and task.created_at.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - task.created_at).total_seconds()) < 5

    plus2 = timezone(timedelta(hours=2))
    eta = datetime(2030, 1, 1, 12, 0, tzinfo=plus2)
    task = Task(func="m:f", eta=eta, expires_at=eta + timedelta(hours=1))
    assert task.eta == eta and task.eta.utcoffset() == timedelta(0) and task.eta.hour == 10
    assert task.expires_at is not None and task.expires_at.utcoffset() == timedelta(0)
    back = roundtrip(task)
    assert back.eta == eta and back.eta.utcoffset() == timedelta(0)

    naive = datetime(2030, 1, 1, 12, 0)
    for make in (
        lambda: Task(func="m:f", eta=naive),
        lambda: Task(func="m:f", expires_at=naive),
        lambda: Task(func="m:f", created_at=naive),
        lambda: TaskResult(task_id="t", status=ResultStatus.SUCCESS, started_at=naive),
        lambda: TaskResult(task_id="t", status=ResultStatus.SUCCESS, finished_at=naive),
        lambda: TaskEvent(task_id="t", type=EventType.STARTED, time=naive),
    ):
        with pytest.raises(ValueError, match="timezone-aware"):
            make()
    result = TaskResult(task_id="t", status=ResultStatus.SUCCESS)
    assert result.finished_at.utcoffset() == timedelta(0)
    assert TaskEvent(task_id="t", type=EventType.STARTED).time.utcoffset() == timedelta(0)


def test_retry_delay_grows_exponentially_and_is_capped() -> None:
    task = Task(func="m:f", retry_backoff=1.0, retry_backoff_max=300.0, retry_jitter=False)
    delays = [task.retry_delay(n, 0.5) for n in range(1, 12)]
    assert delays[:9] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
    assert delays[9:] == [300.0, 300.0]
    assert task.retry_delay(0, 0.5) == 1.0
    for failures in (1023, 1024, 1025, 5_000, 10**9):  # no OverflowError, still capped
        assert task.retry_delay(failures, 0.5) == 300.0

    jittered = Task(func="m:f", retry_backoff=2.0, retry_backoff_max=60.0, retry_jitter=True)
    for failures in range(1, 40):
        full = min(60.0, 2.0 * 2 ** (failures - 1))
        low, high = jittered.retry_delay(failures, 0.0), jittered.retry_delay(failures, 0.999999)
        assert low == pytest.approx(full / 2) and full / 2 <= high <= full
    assert jittered.retry_delay(10**6, 0.999) <= 60.0


def test_priority_and_other_bounds() -> None:
    assert Task(func="m:f", priority=models.MAX_PRIORITY).priority == 999
    assert Task(func="m:f", priority=models.MIN_PRIORITY).priority == -999
    for bad in (models.MAX_PRIORITY + 1, models.MIN_PRIORITY - 1, 10**9):
        with pytest.raises(ValueError, match="priority"):
            Task(func="m:f", priority=bad)
    with pytest.raises(ValueError):
        Task(func="m:f", max_retries=-1)
    with pytest.raises(ValueError):
        Task(func="m:f", attempt=0)


# =========================================================================== names


@pytest.mark.parametrize(
    "name",
    ["default", "a", "Q1", "emails.high-prio_2", "0", "x" * 128, "01HZX3K4M5N6P7Q8R9S0T1V2W3"],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc",
        "a/../b",
        "a/b",
        "/abs",
        "\\\\server\\share",
        "a\\b",
        "C:\\x",
        "C:",
        "nul\x00",
        "bell\x07",
        "line\nbreak",
        "tab\t",
        "with space",
        " lead",
        "trail ",
        "\u00a0nbsp",
        "dеfault",  # Cyrillic 'е' in the middle
        "аbc",  # Cyrillic 'а'
        "ｆｕｌｌ",
        "e\u0301",
        "zero\u200bwidth",
        "x" * (MAX_NAME_LENGTH + 1),
        ".hidden",
        "-opt",
        "_private",
        "~home",
        "a*b",
        "a?b",
        "%2e%2e",
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)
    with pytest.raises(ValueError):
        validate_name(name)


@pytest.mark.parametrize("name", [None, 5, b"bytes", ["a"], Path("a")])
def test_validate_name_rejects_non_strings(name: object) -> None:
    with pytest.raises(InvalidNameError, match="string"):
        validate_name(name)


def test_validate_name_messages() -> None:
    with pytest.raises(InvalidNameError, match="queue name") as info:
        validate_name("a/b", "queue name")
    assert "'/'" in str(info.value)
    with pytest.raises(InvalidNameError, match="128"):
        validate_name("x" * 129)
    with pytest.raises(InvalidNameError, match="empty"):
        validate_name("")
    assert validate_key("queues/default/t-1.json") == "queues/default/t-1.json"
    for bad in ("", "a//b", "/a", "a/", "a/../b", "a/./b"):
        with pytest.raises(InvalidNameError):
            validate_key(bad)


# =========================================================================== errors


def test_every_error_is_an_omniq_error() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    ]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, OmniQError), cls
    assert issubclass(InvalidNameError, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
    assert issubclass(errors.NotFoundError, LookupError)
    assert issubclass(errors.ResultTimeoutError, TimeoutError)
    assert issubclass(errors.AsyncContextError, RuntimeError)
    for name in omniq.core.__all__:
        obj = getattr(omniq.core, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, OmniQError), name


# =========================================================================== Store


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request) -> str:
    return request.param


@pytest.fixture(params=["memory", "local"])
def store(request, tmp_path):
    if request.param == "memory":
        base = f"memory://omniq-core-{uuid.uuid4().hex}"
        yield Store(base)
        fs = fsspec.filesystem("memory")
        if fs.exists(base):
            fs.rm(base, recursive=True)
    else:
        yield Store(str(tmp_path / "store"))


@pytest.mark.anyio
async def test_store_basics(store: Store) -> None:
    assert await store.read("q/a.json") is None
    assert await store.listdir("q") == [] and await store.listdirs("") == []
    assert await store.exists("q/a.json") is False

    assert await store.create("q/a.json", b"first") is True
    assert await store.create("q/a.json", b"second") is False
    assert await store.read("q/a.json") == b"first"

    await store.write("q/a.json", b"replaced")
    assert await store.read("q/a.json") == b"replaced"
    await store.write("q/new.json", b"new")  # write also creates
    assert await store.exists("q/new.json") is True

    for name in ("c.json", "b.json", "A.json", "0.json"):
        await store.write(f"q/{name}", name.encode())
    for d in ("zeta", "alpha", "mid"):
        await store.write(f"dirs/{d}/x", b"")
    assert await store.listdir("q") == sorted(
        ["0.json", "A.json", "a.json", "b.json", "c.json", "new.json"]
    )
    detail = await store.listdir("q", detail=True)
    assert [e.name for e in detail] == await store.listdir("q")
    assert {e.name: e.size for e in detail}["a.json"] == len(b"replaced")
    assert await store.listdirs("dirs") == ["alpha", "mid", "zeta"]
    assert await store.listdirs("") == ["dirs", "q"]
    assert await store.listdir("dirs") == []  # only files directly under the prefix

    got = await store.read_many(["q/a.json", "q/missing.json", "q/b.json"])
    assert got == {"q/a.json": b"replaced", "q/missing.json": None, "q/b.json": b"b.json"}

    assert await store.delete("q/a.json") is True
    assert await store.delete("q/a.json") is False
    assert await store.read("q/a.json") is None
    assert "a.json" not in await store.listdir("q")
    await store.delete_many(["q/b.json", "q/c.json"])
    assert await store.listdir("q") == ["0.json", "A.json", "new.json"]
    await store.probe_exclusive_create()
    await store.aclose()


@pytest.mark.anyio
async def test_listdir_keeps_what_keep_accepts(store: Store) -> None:
    """``keep`` filters names (or entries, with ``detail``) while listing; a local directory
    looks at a name's type only once kept, and still returns files only: not a directory,
    nor a hidden temporary file, however its name reads. A query by task over the event
    index's groups lists through it."""
    for name in ("t1~a.json", "t1~b.json", "t2~a.json", "t10~a.json", "z.jsonl"):
        await store.write(f"g/{name}", name.encode())
    await store.write("g/t1~dir/x", b"")  # a directory whose name is kept
    if store.is_local:  # a writer's temporary file: hidden, wherever its name leads
        (Path(store.root) / "g" / ".t1~c.jsonl").write_bytes(b"")

    def keep(name: str) -> bool:
        return name.startswith("t1~") or name.endswith(".jsonl")

    def program():
        names = yield listdir("g", keep=keep)
        entries = yield listdir("g", True, lambda e: e.size > len("t1~a.json"))
        missing = yield listdir("absent", keep=keep)
        return names, entries, missing

    names, entries, missing = await store.run(program())
    assert names == ["t1~a.json", "t1~b.json", "z.jsonl"]
    assert [e.name for e in entries] == ["t10~a.json"]
    assert missing == []
    await store.aclose()


@pytest.mark.emulator
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_stores_of_one_loop_with_the_same_options_share_a_session(s3_emulator) -> None:
    """A botocore session parses its JSON models once: a worker's four S3 stores, each with
    its own session, parsed them four times on the loop (~60 ms of CPU each when idle,
    0.3-0.7 s on a loaded machine). Stores with other options, or on another loop, keep
    their own."""
    options = s3_emulator.storage_options
    same = [Store(s3_emulator.url(f"share-{uuid.uuid4().hex}"), options) for _ in range(2)]
    other = Store(
        s3_emulator.url(f"share-{uuid.uuid4().hex}"),
        {**options, "config_kwargs": {"read_timeout": 7}},
    )

    def session(store: Store) -> object:
        (ops,) = store._async_ops.values()
        return ops.fs.fs.session

    try:
        for store in (*same, other):
            await store.write("k", b"v")  # requests go through the shared session
            assert await store.read("k") == b"v"
        assert session(same[0]) is session(same[1])
        assert session(other) is not session(same[0])
        elsewhere = Store(same[0].url, options)

        async def on_another_loop() -> object:
            await elsewhere.open()
            found = session(elsewhere)
            await elsewhere.aclose()
            return found

        found = await anyio.to_thread.run_sync(lambda: asyncio.run(on_another_loop()))
        assert found is not session(same[0])
    finally:
        for store in (*same, other):
            await store.aclose()


@pytest.mark.anyio
async def test_store_local_failure_is_storage_error_with_cause(tmp_path) -> None:
    store = Store(str(tmp_path))
    await store.write("blocker", b"a file where a directory should be")
    with pytest.raises(StorageError) as info:
        await store.write("blocker/x.json", b"data")
    assert isinstance(info.value.__cause__, NotADirectoryError)
    assert "blocker/x.json" in str(info.value)
    with pytest.raises(StorageError) as info:
        await store.create("blocker/y.json", b"data")
    assert isinstance(info.value.__cause__, OSError)
    assert await store.read("blocker/x.json") is None  # reading through a file: just absent


@pytest.mark.anyio
async def test_store_transient_failures_are_retried_then_wrapped(monkeypatch) -> None:
    from omniq.core import _fsspec_ops as _ops

    monkeypatch.setattr(_ops, "_backoff", lambda attempt: 0.0)
    store = Store(f"memory://omniq-core-{uuid.uuid4().hex}")
    fs = store._sync_ops.fs  # type: ignore[attr-defined]
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(fs, "pipe_file", flaky)
    with pytest.raises(StorageError) as info:
        await store.write("k/a.json", b"x")
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert len(calls) == _ops.RETRIES

    calls.clear()
    with pytest.raises(StorageError) as info:
        await store.create("k/b.json", b"x")
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert len(calls) == _ops.RETRIES

    def denied(*args, **kwargs):
        calls.append(args)
        raise PermissionError("denied")

    calls.clear()
    monkeypatch.setattr(fs, "pipe_file", denied)
    with pytest.raises(StorageError) as info:
        await store.write("k/c.json", b"x")
    assert isinstance(info.value.__cause__, PermissionError)
    assert len(calls) == 1  # permanent: not retried


def test_store_repr_hides_secrets() -> None:
    pytest.importorskip("s3fs")
    options = {"secret": "PLANTED-SECRET", "key": "k", "endpoint_url": "http://127.0.0.1:1"}
    store = Store("s3://bucket/x", options)
    assert "PLANTED-SECRET" not in repr(store) and "PLANTED-SECRET" not in str(store)
    assert "s3://bucket/x" in repr(store)

    store = Store("s3://user:PLANTED-PASSWORD@bucket/x", options)
    assert "PLANTED-PASSWORD" not in repr(store) and "PLANTED-PASSWORD" not in str(store)
    assert "PLANTED-PASSWORD" not in store.url
    assert "***" in repr(store)
    local = Store("/tmp/omniq-never-created", {"secret": "PLANTED-SECRET"})
    assert "PLANTED-SECRET" not in repr(local)


@pytest.mark.parametrize(
    ("url", "extra"), [("s3://b/x", "s3"), ("gs://b/x", "gcs"), ("abfs://c/x", "azure")]
)
def test_missing_plugin_names_the_extra(monkeypatch, url: str, extra: str) -> None:
    def missing(protocol: str):
        raise ImportError(f"Install {protocol}fs to access {protocol}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(MissingDependencyError) as info:
        Store(url, {"secret": "PLANTED-SECRET"}, package="omniq-file-queue")
    message = str(info.value)
    assert "pip install" in message and f"omniq-file-queue[{extra}]" in message
    assert "PLANTED-SECRET" not in message
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ImportError)


def test_store_rejects_bad_base_dir() -> None:
    with pytest.raises(errors.ConfigurationError):
        Store("")
    with pytest.raises(errors.ConfigurationError):
        Store("memory://")


def test_the_old_store_listing_names_still_work_and_warn(tmp_path: Path) -> None:
    """Store.list/list_detail/list_dirs (0.1.0) became listdir/listdirs: the old names keep
    working for one release, with a DeprecationWarning naming the new call."""
    import asyncio

    async def go() -> None:
        store = Store(str(tmp_path), package="omniq-core")
        await store.write("q/ready/p0999/a.json", b"{}")
        with pytest.warns(DeprecationWarning, match=r"use Store.listdir\(prefix\)"):
            assert await store.list("q/ready/p0999") == ["a.json"]
        with pytest.warns(DeprecationWarning, match="detail=True"):
            assert [e.name for e in await store.list_detail("q/ready/p0999")] == ["a.json"]
        with pytest.warns(DeprecationWarning, match=r"Store.listdirs\(prefix\)"):
            assert await store.list_dirs("q/ready") == ["p0999"]
        await store.aclose()

    asyncio.run(go())
