"""Durable rank logs: flushed in the background, merged in time order, never raising into training."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelora.layout import RunLayout
from pipelora.runlog import (
    DurableLog,
    merge_entries,
    parse_entries,
    read_rank_entries,
    read_rank_logs,
    utc_stamp,
)
from pipelora.storage import Storage, join_uri, open_storage

STAMPED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z (.*)$")


@pytest.fixture(params=["local", "s3"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, RunLayout]:
    """(storage, layout of one run) over a local folder and over the moto S3 server."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return open_storage("s3://x", endpoint_url=endpoint), RunLayout.of(f"s3://{bucket}/runs", "demo")
    return open_storage(str(tmp_path)), RunLayout.of(str(tmp_path / "runs"), "demo")


def wait_until(check: Callable[[], bool], *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def stored_lines(storage: Storage, uri: str) -> list[str]:
    return storage.read_bytes(uri).decode().splitlines() if storage.exists(uri) else []


def test_lines_reach_storage_in_the_background_with_utc_stamps(run: tuple[Storage, RunLayout]) -> None:
    storage, layout = run
    uri = layout.rank_log(0)
    log = DurableLog(storage, uri, flush_every_s=0.1)
    before = utc_stamp()
    log.write("[stage 1/2 dp 0/1] step 1/10 loss 2.000")
    log.write("first\nsecond\n")
    wait_until(lambda: len(stored_lines(storage, uri)) == 3)
    lines = stored_lines(storage, uri)
    assert [STAMPED.match(line).group(1) for line in lines] == [  # type: ignore[union-attr]
        "[stage 1/2 dp 0/1] step 1/10 loss 2.000", "first", "second"]
    assert before <= lines[0][:24] <= utc_stamp() and lines[0][23] == "Z"
    log.write("third")
    log.close()
    assert [line[25:] for line in stored_lines(storage, uri)][-1] == "third"
    log.close()  # a second close (atexit after an explicit one) changes nothing
    assert len(stored_lines(storage, uri)) == 4


def test_nothing_is_uploaded_until_a_flush_when_the_interval_is_long(run: tuple[Storage, RunLayout]) -> None:
    storage, layout = run
    uri = layout.rank_log(3)
    log = DurableLog(storage, uri, flush_every_s=3600)
    log.write("kept in memory")
    time.sleep(0.3)
    assert not storage.exists(uri)
    assert log.flush() is True
    assert [line[25:] for line in stored_lines(storage, uri)] == ["kept in memory"]
    log.close()


def test_ranks_merge_in_time_order_and_stages_select_their_ranks(run: tuple[Storage, RunLayout]) -> None:
    storage, layout = run
    logs = {rank: DurableLog(storage, layout.rank_log(rank), flush_every_s=3600) for rank in range(4)}
    expected = []
    for step in (1, 2):
        for rank in (3, 1, 0, 2):  # not rank order: the merge must follow time
            line = f"rank {rank} step {step}"
            logs[rank].write(line)
            expected.append(line)
            time.sleep(0.003)  # distinct milliseconds
    for log in logs.values():
        log.close()
    storage.write_bytes(join_uri(layout.logs, "notes.txt"), b"not a rank log\n")
    assert read_rank_logs(storage, layout, None) == expected
    assert read_rank_logs(storage, layout, [1, 3]) == [line for line in expected if line.split()[1] in "13"]
    assert read_rank_logs(storage, layout, [7]) == []
    assert sorted(read_rank_entries(storage, layout, None)) == [0, 1, 2, 3]


def test_equal_stamps_keep_rank_order_and_each_rank_its_own_order() -> None:
    t1, t2 = "2026-11-30T04:12:33.123Z", "2026-11-30T04:12:33.124Z"
    per_rank = {
        2: [(t1, "r2 a"), (t2, "r2 b")],
        0: [(t1, "r0 a"), (t1, "r0 b"), (t2, "r0 c")],
        1: [(t2, "r1 a"), (t1, "r1 clock stepped back")],  # stays after its predecessor
    }
    assert merge_entries(per_rank) == ["r0 a", "r0 b", "r2 a", "r0 c", "r1 a", "r1 clock stepped back", "r2 b"]
    text = f"{t1} stamped\nunstamped continuation\n{t2} later\n"
    assert parse_entries(text) == [(t1, "stamped"), (t1, "unstamped continuation"), (t2, "later")]


def test_a_restarted_rank_keeps_the_earlier_attempts_lines(run: tuple[Storage, RunLayout]) -> None:
    storage, layout = run
    uri = layout.rank_log(0)
    first = DurableLog(storage, uri, flush_every_s=3600)
    first.write("attempt 1 failed here")
    first.close()
    second = DurableLog(storage, uri, flush_every_s=3600)
    second.write("attempt 2 resumes")
    second.close()
    assert read_rank_logs(storage, layout, [0]) == ["attempt 1 failed here", "attempt 2 resumes"]


def test_a_failing_upload_is_reported_once_and_retried(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    storage = open_storage(str(tmp_path))
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should be")
    layout = RunLayout.of(str(blocker), "demo")
    uri = layout.rank_log(0)
    log = DurableLog(storage, uri, flush_every_s=3600)
    log.write("line 1")
    assert log.flush() is False  # no exception reaches the caller
    log.write("line 2")
    assert log.flush() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cannot save this rank's log to {uri} (")
    blocker.unlink()
    log.write("line 3")
    assert log.flush() is True
    assert read_rank_logs(storage, layout, None) == ["line 1", "line 2", "line 3"]
    log.close()
    assert capsys.readouterr().err == ""


def test_an_unreachable_store_never_raises_into_the_writer(capsys: pytest.CaptureFixture) -> None:
    storage = open_storage("s3://x", endpoint_url="http://127.0.0.1:9")
    uri = RunLayout.of("s3://bucket/runs", "demo").rank_log(0)
    log = DurableLog(storage, uri, flush_every_s=0.05)
    for i in range(20):
        log.write(f"step {i}")
    log.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and uri in err[0] and "unreachable" in err[0]


@pytest.mark.parametrize("ending", ["atexit", "exception"])
def test_lines_written_just_before_exit_are_saved(run: tuple[Storage, RunLayout], ending: str) -> None:
    """A rank that exits (or dies on an exception) right after writing still leaves its last lines."""
    storage, layout = run
    endpoint = getattr(storage, "endpoint_url", None)
    script = textwrap.dedent(f"""
        import atexit
        from pipelora.runlog import DurableLog
        from pipelora.storage import open_storage
        storage = open_storage({layout.run_uri!r}, endpoint_url={endpoint!r})
        log = DurableLog(storage, {layout.rank_log(5)!r}, flush_every_s=3600)
        atexit.register(log.close)
        log.write("step 1")
        if {ending!r} == "exception":
            try:
                raise RuntimeError("boom")
            except RuntimeError as exc:
                log.write(f"failed: {{exc}}")
                log.close()
                raise
        log.write("done")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == (ending == "atexit"), proc.stderr
    expected = ["step 1", "done"] if ending == "atexit" else ["step 1", "failed: boom"]
    assert read_rank_logs(storage, layout, [5]) == expected
