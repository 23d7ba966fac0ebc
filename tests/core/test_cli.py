"""The CLI shell: version, validate, schema, help examples, and user errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelora import __version__
from pipelora.workflow.cli import cli

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "local-tiny.yaml")
CLUSTER = str(REPO / "examples" / "mistral-7b-alpaca.yaml")


def run(args: list[str]) -> tuple[int, str, str]:
    """Through main(), as the console script runs it (user errors become messages and exit codes)."""
    proc = subprocess.run([sys.executable, "-c", "from pipelora.workflow.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pipelora-k8s, version {__version__}"


def test_validate_prints_the_resolved_spec_with_flags_applied() -> None:
    result = CliRunner().invoke(cli, ["validate", "--config", CLUSTER, "--stages", "4", "--set", "training.lr=1e-4"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["parallel"]["stages"] == 4 and resolved["parallel"]["nodes"] == 2
    assert resolved["training"]["lr"] == 1e-4 and resolved["name"] == "alpaca-mistral"


def test_validate_lists_every_error_and_exits_2() -> None:
    code, out, err = run(["validate", "--config", CLUSTER, "--stages", "3", "--set", "lora.r=0"])
    assert code == 2 and out == ""
    assert err.startswith("error: invalid job spec in ")
    assert "cannot be split into 3 stages" in err and "lora.r must be positive (got 0)" in err
    assert "Traceback" not in err


def test_validate_bad_set_syntax() -> None:
    code, _, err = run(["validate", "--config", TINY, "--set", "training.lr"])
    assert code == 2 and "is not KEY=VALUE" in err and "Traceback" not in err


def test_missing_config_file_is_one_message(tmp_path: Path) -> None:
    code, _, err = run(["validate", "--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_pipeline_bubble_warning_is_one_line() -> None:
    code, _, err = run(["validate", "--config", CLUSTER, "--set", "parallel.micro_batches=9"])
    assert code == 0
    lines = err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines), err  # not Python's file:line format
    assert lines[0] == (
        "warning: parallel.micro_batches (9) is below 2 x stages (16): the pipeline bubble is 44% of each step; "
        "raise micro_batches to fill the pipeline"
    )


def test_one_stage_validates_without_a_bubble_warning() -> None:
    code, _, err = run(["validate", "--config", TINY, "--stages", "1", "--gpus-per-node", "1", "--micro-batches", "1"])
    assert code == 0 and "bubble" not in err, err


def test_validate_rejects_a_template_that_cannot_render_the_format() -> None:
    code, out, err = run(["validate", "--config", TINY, "--set", "dataset.format=messages",
                          "--set", "lora.target_modules=[q_proj, o_proj, lm_head]"])
    assert code == 2 and out == "" and "Traceback" not in err
    assert "  - dataset.template 'alpaca' cannot render dataset.format 'messages' records; use template: chat" in err
    assert "  - lora.target_modules names lm_head, which are not linear layers" in err


def test_schema_is_json_schema_of_the_spec() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    schema = json.loads(result.output)
    assert schema["title"] == "pipelora-k8s job spec" and "parallel" in schema["properties"]


def test_every_command_help_shows_an_example() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "Example" in top.output
    ctx = cli.make_context("pipelora-k8s", ["--help"], resilient_parsing=True)
    for name in cli.list_commands(ctx):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Example" in result.output, f"`pipelora-k8s {name} --help` shows no example"


@pytest.mark.parametrize("args", [["--version"], ["validate", "--config", TINY], ["schema"]])
def test_installed_console_script(args: list[str]) -> None:
    script = Path(sys.executable).parent / "pipelora-k8s"
    proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout
