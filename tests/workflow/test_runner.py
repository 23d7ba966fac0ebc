"""The local runner's pieces that the end-to-end run does not isolate: environment, hostfile, failures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipelora.config import spec_from_dict
from pipelora.workflow.cli import main
from pipelora.workflow.commands import local_hostfile_text
from pipelora.workflow.runner import RunError, local_commands, run_environment, summarize


def spec_for(tmp_path: Path, **parallel: int):  # noqa: ANN201
    return spec_from_dict({
        "name": "unit",
        "storage": {"uri": str(tmp_path / "runs")},
        "model": {"uri": str(tmp_path / "model")},
        "dataset": {"uri": str(tmp_path / "data.jsonl")},
        "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batches": 4, **parallel},
    })


def test_environment_puts_this_installation_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = run_environment(spec_for(tmp_path))
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert "PYTHONUNBUFFERED" not in env  # would split every rank's line under --tag-output
    assert int(env["OMP_NUM_THREADS"]) >= 1


def test_several_nodes_share_localhost_by_oversubscribing(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, nodes=2, gpus_per_node=2, stages=4, micro_batches=8)
    assert local_hostfile_text(spec) == "localhost slots=2\n"
    cmds = local_commands(spec, config=tmp_path / "job.yaml", hostfile=tmp_path / "hostfile", master_port=40123)
    argv = cmds.launcher
    assert argv[argv.index("-np") + 1] == "4" and "--oversubscribe" in argv
    assert "MASTER_PORT=40123" in argv and "MASTER_ADDR=127.0.0.1" in argv
    assert not any(a.startswith("PIPELORA_RANK_RELAY_DIR=") for a in argv)  # only pods relay


def test_missing_adapter_is_reported(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    (tmp_path / "runs" / "unit").mkdir(parents=True)
    with pytest.raises(RunError, match="no complete adapter was written at .*/runs/unit/adapter"):
        summarize(spec, workdir=tmp_path, echo=lambda _: None)


def test_a_failing_step_stops_the_run_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec_for(tmp_path).model_dump(mode="json")))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(config), "--no-make-missing"])
    err = capsys.readouterr().err
    assert exc.value.code != 0
    assert err.strip().splitlines()[-1].startswith("error: dataprep failed with exit code ")
    assert not (tmp_path / "runs" / "unit" / "progress.json").exists()
