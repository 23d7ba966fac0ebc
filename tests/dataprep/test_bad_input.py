"""Every kind of bad input: one clear sentence naming where, skip-and-count up to the limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelora.config import ConfigError
from pipelora.dataprep import BadInputError, DataprepError
from pipelora.dataprep.pipeline import run_dataprep

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"instruction": "x", "output": ', "malformed JSON"),
        ({"instruction": "Say hi."}, "missing key 'output'"),
        ({"input": "", "output": "hi"}, "missing key 'instruction'"),
        ({"instruction": 5, "output": "hi"}, "'instruction' is a int, not a string"),
        ({"instruction": "Say hi.", "output": ["hi"]}, "'output' is a list, not a string"),
        ({"instruction": "Say hi.", "output": "  "}, "empty output"),
        ('["not", "an", "object"]', "record is a list"),
        (b'{"instruction": "caf\xe9", "output": "hi"}', "invalid UTF-8"),
    ],
)
def test_bad_jsonl_record_fails_naming_the_line(write_jsonl, make_spec, bad, reason):
    path = write_jsonl([GOOD, bad, GOOD])
    with pytest.raises(BadInputError) as info:
        run_dataprep(make_spec(path))
    message = str(info.value)
    assert f"{path} line 2: {reason}" in message
    assert "1 of the first 3 records" in message and "max_bad_fraction" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role is 'robot'"),
        ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
        ({"messages": "hi"}, "'messages' is a str, not a list"),
        ({"conversations": []}, "missing key 'messages'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
    ],
)
def test_bad_messages_record(write_jsonl, make_spec, bad, reason):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl([good, bad])
    with pytest.raises(BadInputError, match="line 2: " + reason.replace("[", r"\[").replace("]", r"\]")):
        run_dataprep(make_spec(path, format="messages", template="chat"))


def test_skips_and_counts_up_to_max_bad_fraction(write_jsonl, make_spec):
    records = [GOOD] * 8 + [{"instruction": "x"}, '{"broken']
    path = write_jsonl(records)
    manifest = run_dataprep(make_spec(path, max_bad_fraction=0.2)).manifest
    assert manifest["stats"]["skipped"] == 2 and manifest["stats"]["examples"] == 8
    assert manifest["stats"]["skipped_first"] == [f"{path} line 9: missing key 'output'",
                                                  f"{path} line 10: malformed JSON: Unterminated string starting at (column 2)"]
    with pytest.raises(BadInputError, match=r"2 of 10 records are unusable \(dataset.max_bad_fraction is 0.1\); first: .*line 9"):
        run_dataprep(make_spec(path, max_bad_fraction=0.1, name="other"))


def test_malformed_json_array_names_line_and_column(tmp_path, make_spec):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(DataprepError, match=r"is not valid JSON: Expecting ',' delimiter at line 3, column 23"):
        run_dataprep(make_spec(path))


def test_invalid_utf8_in_a_json_array_costs_one_record(tmp_path, make_spec):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": "\xff\xfe", "output": "b"}]')
    with pytest.raises(BadInputError, match="record 1: invalid UTF-8"):
        run_dataprep(make_spec(path))
    manifest = run_dataprep(make_spec(path, max_bad_fraction=0.5)).manifest
    assert manifest["stats"]["skipped"] == 1 and manifest["stats"]["examples"] == 1


@pytest.mark.parametrize(("name", "content"), [("data.jsonl", b""), ("data.json", b"[]"), ("blank.jsonl", b"\n\n")])
def test_empty_dataset(tmp_path, make_spec, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataprepError, match="is empty: it holds no records"):
        run_dataprep(make_spec(path))


def test_json_object_instead_of_array(tmp_path, make_spec):
    path = tmp_path / "data.json"
    path.write_text('{"data": [1, 2]}\n{"x": 1}')  # starts with "{": read as JSONL, line 1 is a dict without keys
    with pytest.raises(BadInputError, match="line 1: missing key 'instruction'"):
        run_dataprep(make_spec(path))
    path.write_text('"just a string"')
    with pytest.raises(DataprepError, match="holds a JSON str, not an array of records"):
        run_dataprep(make_spec(path))


def test_unknown_file_type_and_format(tmp_path, make_spec):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(DataprepError, match=r"unknown file type '.csv'; use .json \(array\), .jsonl or .parquet"):
        run_dataprep(make_spec(path))
    with pytest.raises(ConfigError, match="dataset.format"):
        make_spec(tmp_path / "data.jsonl", format="sharegpt")


def test_missing_dataset_and_model(tmp_path, make_spec, write_jsonl):
    with pytest.raises(DataprepError, match="does not exist; set dataset.uri"):
        run_dataprep(make_spec(tmp_path / "absent.jsonl"))
    with pytest.raises(DataprepError, match="model folder .* does not exist"):
        run_dataprep(make_spec(write_jsonl([GOOD]), model=str(tmp_path / "no-model")))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(DataprepError, match="has no tokenizer files"):
        run_dataprep(make_spec(write_jsonl([GOOD]), model=str(tmp_path / "empty-model")))


def test_alpaca_template_rejects_messages_format(write_jsonl, make_spec):
    # a rule of the spec: `validate` and `submit` refuse it before any pod runs
    with pytest.raises(ConfigError, match="use template: chat"):
        make_spec(write_jsonl([GOOD]), format="messages", template="alpaca")


def test_overlong_truncated_or_dropped_and_counted(write_jsonl, make_spec):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 400}
    path = write_jsonl([GOOD, long, GOOD])
    truncated = run_dataprep(make_spec(path, seq_len=64, name="trunc")).manifest["stats"]
    assert (truncated["truncated"], truncated["dropped"], truncated["examples"]) == (1, 0, 3)
    dropped = run_dataprep(make_spec(path, seq_len=64, overlong="drop", name="drop")).manifest["stats"]
    assert (dropped["truncated"], dropped["dropped_overlong"], dropped["dropped"]) == (0, 1, 1)
    assert dropped["tokens"] == truncated["tokens"] - 64
    # A prompt longer than seq_len leaves nothing to learn after truncation: dropped, and counted as such.
    huge_prompt = {"instruction": "word " * 400, "output": "x"}
    stats = run_dataprep(make_spec(write_jsonl([GOOD, huge_prompt], name="p.jsonl"), seq_len=64, name="np")).manifest["stats"]
    assert (stats["truncated"], stats["dropped_no_labels"], stats["dropped"]) == (1, 1, 1)


def test_cli_prints_one_error_line_and_no_traceback(tmp_path, tokenizer_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{oops\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: cli\nstorage: {{uri: {tmp_path / 'runs'}}}\nmodel: {{uri: {tokenizer_dir}}}\n"
        f"dataset: {{uri: {data}, seq_len: 128}}\nparallel: {{stages: 1, micro_batches: 2}}\n"
    )
    exe = Path(sys.executable).with_name("pipelora-k8s")
    proc = subprocess.run([str(exe), "dataprep", "--config", str(job)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: dataset ") and f"{data} line 2: malformed JSON" in proc.stderr
    assert not (tmp_path / "runs" / "cli" / "data" / "manifest.json").exists()
