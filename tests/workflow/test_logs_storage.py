"""`logs` from the ranks' durable logs in S3 (moto over HTTP) when no pod or cluster is left to ask."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelora.config import JobSpec, spec_from_dict
from pipelora.runlog import DurableLog
from pipelora.storage import storage_for
from pipelora.workflow.cli import main
from pipelora.workflow.logs import NoLogs, job_logs, run_over

NAME = "finished-run"


def spec_data(bucket: str, endpoint: str) -> dict[str, Any]:
    return {"name": NAME, "storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": endpoint},
            "model": {"uri": f"s3://{bucket}/models/m"}, "dataset": {"uri": f"s3://{bucket}/data/a.jsonl"},
            "parallel": {"stages": 2, "nodes": 2, "gpus_per_node": 1, "micro_batches": 4}}


@pytest.fixture
def spec(tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> JobSpec:
    """A two-stage run in S3, and no cluster configured at all."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    data = spec_data(s3_bucket, s3_endpoint)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    return spec_from_dict(data)


def step_line(rank: int, step: int) -> str:
    return f"[stage {rank + 1}/2 dp 0/1] step {step}/6 loss {2.0 - step / 10:.3f}"


def train(spec: JobSpec, steps: range, *, state: str | None = None, pause_s: float = 0.0) -> list[str]:
    """What two ranks leave behind: their durable logs (and progress.json when `state` is given)."""
    storage = storage_for(spec, spec.run_uri)
    logs = [DurableLog(storage, spec.layout.rank_log(rank), flush_every_s=0.05) for rank in (0, 1)]
    written = []
    for step in steps:
        for rank in (1, 0):
            logs[rank].write(step_line(rank, step))
            written.append(step_line(rank, step))
            time.sleep(0.003)
        time.sleep(pause_s)
    for log in logs:
        log.close()
    if state:
        storage.write_json(spec.layout.progress, {"state": state, "step": steps[-1], "max_steps": 6})
    return written


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_a_finished_run_shows_every_rank_in_time_order(spec: JobSpec, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    lines = train(spec, range(1, 4), state="finished")
    config = str(tmp_path / "job.yaml")
    code, out, err = cli(["logs", NAME, "--config", config], capsys)
    assert code == 0, err
    assert out.splitlines() == lines
    assert err.strip() == f"(from storage: {spec.layout.logs}, no Kubernetes configuration found)"
    code, out, err = cli(["logs", NAME, "--config", config, "--stage", "2", "--tail", "2"], capsys)
    assert code == 0, err
    assert out.splitlines() == [step_line(1, 2), step_line(1, 3)]
    # the run is over, so --follow prints what is there and ends
    code, out, err = cli(["logs", NAME, "--config", config, "--follow"], capsys)
    assert code == 0, err
    assert out.splitlines() == lines


def test_follow_streams_new_lines_until_progress_says_the_run_ended(spec: JobSpec) -> None:
    before = train(spec, range(1, 2))
    storage_for(spec, spec.run_uri).write_json(spec.layout.progress, {"state": "running", "step": 1})
    view = job_logs(None, spec, follow=True, tail=1, why="the cluster cannot be reached",
                    finished=run_over(None, spec), poll_s=0.1)
    assert view.source == f"(from storage: {spec.layout.logs}, the cluster cannot be reached)"
    later: list[str] = []
    writer = threading.Thread(target=lambda: later.extend(train(spec, range(2, 5), state="failed", pause_s=0.15)))
    writer.start()
    started = time.monotonic()
    shown = list(view.lines)  # returns only because progress.json turned to failed
    writer.join()
    assert time.monotonic() - started < 30
    assert shown == before[-1:] + later  # --tail 1 of what was there, then every new line once, in order


def test_nothing_stored_and_no_cluster_is_one_sentence(spec: JobSpec, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["logs", NAME, "--config", str(tmp_path / "job.yaml")], capsys)
    assert code == 1 and out == ""
    assert err.strip() == (f"error: no logs of job {NAME} in storage at {spec.layout.logs}, "
                           "and no Kubernetes configuration found")
    with pytest.raises(NoLogs, match="the dataprep log is kept only in its pod, and the release is gone"):
        job_logs(None, spec, component="dataprep", why="the release is gone")
