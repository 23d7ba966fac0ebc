"""The job spec: every validation rule, valid and invalid, with the message a user sees."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from pipelora.config import ConfigError, JobSpec, SpecWarning, json_schema, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[2]


def base_spec(**sections: dict) -> dict:
    spec = {
        "name": "alpaca-mistral",
        "storage": {"uri": "s3://bucket/pipelora"},
        "model": {"uri": "s3://bucket/models/mistral-7b"},
        "dataset": {"uri": "s3://bucket/data/alpaca.json"},
        "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batches": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def errors_of(data: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data, **kwargs)
    return info.value.messages


def test_valid_spec_fills_design_defaults() -> None:
    spec = spec_from_dict(base_spec())
    assert spec.dataset.format == "alpaca" and spec.dataset.seq_len == 2048 and spec.dataset.packing is True
    assert spec.lora.r == 16 and spec.lora.alpha == 32 and spec.lora.target_modules == "all-linear"
    assert spec.training.schedule == "cosine" and spec.training.keep_checkpoints == 3
    assert spec.parallel.world_size == 2 and spec.parallel.data_parallel == 1
    assert spec.run_uri == "s3://bucket/pipelora/alpaca-mistral"
    assert spec.layout.manifest == "s3://bucket/pipelora/alpaca-mistral/data/manifest.json"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name


def test_cluster_example_is_8_stages_on_2_nodes_of_4() -> None:
    spec = load_spec(REPO / "examples" / "mistral-7b-alpaca.yaml")
    p = spec.parallel
    assert (p.stages, p.nodes, p.gpus_per_node, p.data_parallel) == (8, 2, 4, 1)
    assert spec.storage.uri.startswith("s3://")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Alpaca", "not a DNS-1035 label"),
        ("1run", "not a DNS-1035 label"),
        ("run_1", "not a DNS-1035 label"),
        ("run-", "not a DNS-1035 label"),
        ("a" * 41, "has 41 characters; at most 40"),
    ],
)
def test_name_must_be_a_short_dns_label(name: str, fragment: str) -> None:
    (message,) = errors_of(base_spec(name=name))
    assert fragment in message and name in message


def test_name_of_40_characters_is_accepted() -> None:
    assert spec_from_dict(base_spec(name="a" * 40)).name == "a" * 40


def test_world_size_must_split_into_stages() -> None:
    (message,) = errors_of(base_spec(parallel={"stages": 3, "nodes": 2, "gpus_per_node": 4}))
    assert message == (
        "parallel: nodes x gpus_per_node = 2 x 4 = 8 ranks cannot be split into 3 stages; "
        "make it a multiple of parallel.stages"
    )


def test_micro_batches_below_stages_is_an_error() -> None:
    (message,) = errors_of(base_spec(parallel={"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batches": 4}))
    assert "micro_batches (4) is below parallel.stages (8)" in message and "micro_batches >= 8" in message


def test_micro_batches_below_twice_stages_warns_with_the_bubble() -> None:
    with pytest.warns(SpecWarning, match=r"bubble is 44% of each step"):
        spec_from_dict(base_spec(parallel={"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batches": 9}))


def test_one_stage_has_no_bubble_to_warn_about() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_dict(base_spec(parallel={"stages": 1, "nodes": 1, "gpus_per_node": 1, "micro_batches": 1}))
    assert spec.parallel.stages == 1 and spec.parallel.micro_batches == 1


def test_two_stages_with_few_micro_batches_warn() -> None:
    with pytest.warns(SpecWarning) as record:
        spec_from_dict(base_spec(parallel={"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batches": 2}))
    (warning,) = record
    assert str(warning.message) == (
        "parallel.micro_batches (2) is below 2 x stages (4): the pipeline bubble is 33% of each step; "
        "raise micro_batches to fill the pipeline"
    )


def test_enough_micro_batches_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_from_dict(base_spec(parallel={"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batches": 16}))


@pytest.mark.parametrize("field", ["storage", "model", "dataset"])
def test_uri_scheme_must_be_known(field: str) -> None:
    (message,) = errors_of(base_spec(**{field: {"uri": "gs://bucket/x"}}))
    assert message.startswith(f"{field}.uri uses the unsupported scheme 'gs://'")


@pytest.mark.parametrize("uri", ["s3://bucket/x", "file:///data/x", "/data/x", "relative/x"])
def test_known_uri_forms_are_accepted(uri: str) -> None:
    assert spec_from_dict(base_spec(storage={"uri": uri})).storage.uri == uri


def test_s3_uri_without_bucket_is_rejected() -> None:
    (message,) = errors_of(base_spec(storage={"uri": "s3:///prefix"}))
    assert "has no bucket" in message


def test_endpoint_must_be_http() -> None:
    (message,) = errors_of(base_spec(storage={"uri": "s3://b/p", "endpoint_url": "minio:9000"}))
    assert "must start with http:// or https://" in message


@pytest.mark.parametrize(
    ("section", "values", "fragment"),
    [
        ("dataset", {"seq_len": 0}, "dataset.seq_len must be positive (got 0)"),
        ("lora", {"r": 0}, "lora.r must be positive (got 0)"),
        ("lora", {"alpha": -1}, "lora.alpha must be positive (got -1"),
        ("training", {"lr": 0}, "training.lr must be positive (got 0"),
        ("lora", {"target_modules": []}, "lora.target_modules is an empty list"),
    ],
)
def test_positive_fields(section: str, values: dict, fragment: str) -> None:
    (message,) = errors_of(base_spec(**{section: values}))
    assert fragment in message


def test_alpaca_template_cannot_render_messages_records() -> None:
    (message,) = errors_of(base_spec(dataset={"format": "messages", "template": "alpaca"}))
    assert message == (
        "dataset.template 'alpaca' cannot render dataset.format 'messages' records; use template: chat for messages data"
    )


@pytest.mark.parametrize(("fmt", "template"), [("alpaca", "alpaca"), ("alpaca", "chat"), ("messages", "chat")])
def test_template_and_format_pairs_that_render(fmt: str, template: str) -> None:
    spec = spec_from_dict(base_spec(dataset={"format": fmt, "template": template}))
    assert (spec.dataset.format, spec.dataset.template) == (fmt, template)


def test_unknown_target_module_is_rejected_with_the_known_names() -> None:
    (message,) = errors_of(base_spec(lora={"target_modules": ["q_proj", "lm_head", "qproj"]}))
    assert message == (
        "lora.target_modules names lm_head, qproj, which are not linear layers of a supported decoder layer; "
        "use all-linear or some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )


def test_known_target_modules_are_accepted() -> None:
    spec = spec_from_dict(base_spec(lora={"target_modules": ["v_proj", "q_proj", "down_proj"]}))
    assert spec.lora.target_modules == ["v_proj", "q_proj", "down_proj"]


def test_unknown_key_suggests_the_closest_valid_key() -> None:
    (message,) = errors_of(base_spec(training={"max_step": 10}))
    assert message == "training.max_step: unknown key 'max_step'; did you mean 'training.max_steps'?"


def test_unknown_top_level_key_suggests_the_section() -> None:
    (message,) = errors_of({**base_spec(), "paralel": {"stages": 2}})
    assert message == "paralel: unknown key 'paralel'; did you mean 'parallel'?"


def test_unknown_key_without_a_near_match_gets_no_guess() -> None:
    (message,) = errors_of(base_spec(lora={"zzzzzz": 1}))
    assert message == "lora.zzzzzz: unknown key 'zzzzzz'"


def test_every_problem_is_reported_at_once() -> None:
    data = base_spec(name="Bad_Name", lora={"r": 0}, dataset={"uri": "s3://b/x", "seq_len": -5})
    messages = errors_of(data)
    assert len(messages) == 3
    assert any("name 'Bad_Name'" in m for m in messages)


def test_spec_rules_of_every_section_are_reported_together() -> None:
    data = base_spec(
        dataset={"format": "messages", "template": "alpaca"},
        lora={"target_modules": ["attn"]},
        parallel={"stages": 3, "nodes": 1, "gpus_per_node": 2, "micro_batches": 1},
    )
    messages = errors_of(data)
    assert len(messages) == 4, messages
    assert [m.split(" ", 1)[0] for m in messages[:2]] == ["dataset.template", "lora.target_modules"]
    assert "cannot be split into 3 stages" in messages[2] and "micro_batches (1) is below" in messages[3]


def test_missing_required_section() -> None:
    data = base_spec()
    del data["model"]
    assert errors_of(data) == ["model: required field is missing"]


def test_wrong_type_names_field_and_value() -> None:
    (message,) = errors_of(base_spec(parallel={"stages": "two"}))
    assert message.startswith("parallel.stages:") and "'two'" in message


def test_overrides_win_over_the_file() -> None:
    spec = spec_from_dict(
        base_spec(), overrides={"parallel.stages": 8, "parallel.nodes": 2, "parallel.gpus_per_node": 4,
                                "parallel.micro_batches": 16, "training.lr": 1e-4}
    )
    assert spec.parallel.stages == 8 and spec.parallel.world_size == 8 and spec.training.lr == 1e-4


def test_override_errors_are_validated_like_the_file() -> None:
    (message,) = errors_of(base_spec(), overrides={"parallel.stages": 3})
    assert "cannot be split into 3 stages" in message


def test_load_spec_reports_yaml_syntax_with_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nstorage: {uri: s3://b\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert "is not valid YAML at line" in str(info.value)


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_non_mapping_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        load_spec(path)


def test_resolved_spec_round_trips_through_yaml() -> None:
    spec = spec_from_dict(base_spec(), overrides={"training.max_steps": 7})
    again = JobSpec.model_validate(yaml.safe_load(spec.to_yaml()))
    assert again == spec and again.training.max_steps == 7


def test_json_schema_describes_every_section() -> None:
    schema = json_schema()
    assert set(schema["properties"]) >= {"name", "storage", "model", "dataset", "lora", "parallel", "training"}
    assert schema["required"] == ["name", "storage", "model", "dataset"]
    assert schema["$defs"]["TrainingSpec"]["additionalProperties"] is False
