"""hf:// sources: the grammar, the model mirror in the storage root, and one sentence per Hub failure.

Everything here talks real HTTP to the fake hub in `tests/support/fake_hub.py` (huggingface_hub's
own client, pointed at it by `HF_ENDPOINT`). The end-to-end dataprep runs are in
`tests/dataprep/test_hub_dataprep.py`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from fake_hub import FakeHub  # noqa: E402
from net import free_port  # noqa: E402

from pipelora import hub as hubmod  # noqa: E402
from pipelora.config import ConfigError, SpecWarning, check_against_model, spec_from_dict  # noqa: E402
from pipelora.hub import HubError, HubRef, mirror_model, model_storage_uri, parse_hub_uri  # noqa: E402
from pipelora.layout import HUB_MARKER, hub_model_marker, hub_model_uri  # noqa: E402
from pipelora.storage import open_storage  # noqa: E402

GOOD, GRANTED, UNGRANTED = "hf_good", "hf_granted", "hf_not_granted"
MISTRAL_CONFIG = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "vocab_size": 1000}


def _bytes(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def model_files(config: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A model repository as the Hub holds one: what the trainer reads, and what it must not get."""
    index = {"metadata": {"total_size": 300_000},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    return {
        "config.json": json.dumps(config or MISTRAL_CONFIG).encode(),
        "generation_config.json": b'{"bos_token_id": 1}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": _bytes("shard1", 150_000),
        "model-00002-of-00002.safetensors": _bytes("shard2", 120_000),
        "tokenizer.model": _bytes("tok", 70_000),
        "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}',
        # never mirrored: other formats, weights outside the index, docs, sub-folders
        "consolidated.safetensors": _bytes("consolidated", 90_000),
        "pytorch_model.bin": _bytes("bin", 80_000),
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "original/params.json": b"{}",
    }


MIRRORED = {"config.json", "generation_config.json", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model",
            "tokenizer_config.json"}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub(tokens={GOOD, GRANTED, UNGRANTED}).start()
    fake.add_repo("model", "acme/tiny", model_files())
    fake.add_repo("model", "acme/gated", model_files(), gated=True, granted={GRANTED})
    fake.add_repo("dataset", "acme/alpaca", {"data/train-00000-of-00001.parquet": b"PAR1", "README.md": b"#"})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", GOOD)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake
    fake.stop()
    assert fake.unknown == [], f"the fake hub was asked for paths it does not implement: {fake.unknown}"


def mirror(root: Path | str, uri: str, tmp_path: Path) -> hubmod.ModelMirror:
    ref = parse_hub_uri(uri, field="model.uri", kind="model")
    return mirror_model(ref, storage=open_storage(str(root)), storage_uri=str(root), scratch=tmp_path / "scratch",
                        log=lambda line: None)


# -- grammar ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "kind", "expected"), [
    ("hf://mistralai/Mistral-7B-v0.1", "model", HubRef("model", "mistralai", "Mistral-7B-v0.1", "main")),
    ("hf://meta-llama/Llama-3.1-8B@v1.0", "model", HubRef("model", "meta-llama", "Llama-3.1-8B", "v1.0")),
    ("hf://org/name@refs/pr/12", "model", HubRef("model", "org", "name", "refs/pr/12")),
    ("hf://org/name@" + "a" * 40, "model", HubRef("model", "org", "name", "a" * 40)),
    ("hf://datasets/tatsu-lab/alpaca", "dataset", HubRef("dataset", "tatsu-lab", "alpaca", "main", "train")),
    ("hf://datasets/tatsu-lab/alpaca#test", "dataset", HubRef("dataset", "tatsu-lab", "alpaca", "main", "test")),
    ("hf://datasets/o/n.x_y@dev#validation", "dataset", HubRef("dataset", "o", "n.x_y", "dev", "validation")),
])
def test_the_grammar_parses(uri: str, kind: str, expected: HubRef) -> None:
    ref = parse_hub_uri(uri, field=f"{kind}.uri", kind=kind)
    assert ref == expected
    assert parse_hub_uri(str(ref), field="x", kind=kind) == ref  # the canonical form reads back the same


@pytest.mark.parametrize(("uri", "kind", "says"), [
    ("hf://datasets/tatsu-lab/alpaca", "model", "names a dataset repository"),
    ("hf://tatsu-lab/alpaca", "dataset", "hf://datasets/tatsu-lab/alpaca"),
    ("hf://spaces/org/app", "model", "names a Space"),
    ("hf://mistral", "model", "hf://<org>/<name>[@<revision>]"),
    ("hf://org/name/extra", "model", "hf://<org>/<name>[@<revision>]"),
    ("hf://org/na--me", "model", "not a Hugging Face Hub model URI"),
    ("hf://org/name@", "model", "not a Hugging Face Hub model URI"),
    ("hf://org/name#train", "model", "not a Hugging Face Hub model URI"),
    ("hf://datasets/org/name#", "dataset", "hf://datasets/<org>/<name>[@<revision>][#<split>]"),
    ("hf://datasets/org/name#a b", "dataset", "not a Hugging Face Hub dataset URI"),
])
def test_the_grammar_refuses_with_the_form_to_write(uri: str, kind: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hub_uri(uri, field=f"{kind}.uri", kind=kind)
    assert says in str(info.value)
    assert str(info.value).startswith(f"{kind}.uri '{uri}'")


def spec_tree(model: str, dataset: str = "data.jsonl", storage: str = "runs") -> dict[str, Any]:
    return {"name": "hubrun", "storage": {"uri": storage}, "model": {"uri": model}, "dataset": {"uri": dataset}}


def test_the_spec_takes_hub_uris_for_the_model_and_the_dataset_only() -> None:
    spec = spec_from_dict(spec_tree("hf://mistralai/Mistral-7B-v0.1@main", "hf://datasets/tatsu-lab/alpaca#train"))
    assert spec.model.uri == "hf://mistralai/Mistral-7B-v0.1@main"
    with pytest.raises(ConfigError) as info:
        spec_from_dict(spec_tree("hf://datasets/a/b", "hf://a/b", storage="hf://a/b"))
    messages = info.value.messages
    assert any(m.startswith("model.uri 'hf://datasets/a/b' names a dataset repository") for m in messages)
    assert any(m.startswith("dataset.uri 'hf://a/b' names a model repository") for m in messages)
    assert any(m.startswith("storage.uri uses the unsupported scheme 'hf://'") for m in messages)
    with pytest.raises(ConfigError) as info:
        spec_from_dict(spec_tree("gs://bucket/model"))
    assert "hf://<org>/<name>[@<revision>] (Hugging Face Hub)" in info.value.messages[0]


# -- the mirror ----------------------------------------------------------------------------------------


def test_the_model_is_mirrored_once_and_committed_with_sizes_and_sha256(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "store"
    repo = hub.repo("model", "acme/tiny")
    sha = repo.refs["main"]
    first = mirror(root, "hf://acme/tiny", tmp_path)
    assert (first.sha, first.uri) == (sha, hub_model_uri(str(root), "acme", "tiny", sha))
    assert first.downloaded == len(MIRRORED)
    assert sorted(hub.file_downloads("acme/tiny")) == sorted(MIRRORED)  # each file once, nothing else
    marker = json.loads(Path(hub_model_marker(str(root), "acme", "tiny", sha)).read_text())
    assert set(marker["files"]) == MIRRORED
    for name, meta in marker["files"].items():
        data = repo.commits[sha][name]
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert (Path(first.uri) / name).read_bytes() == data
    assert (marker["sha"], marker["repo"], marker["revision"]) == (sha, "acme/tiny", "main")
    assert not (tmp_path / "scratch").exists() or not any(p.is_file() and p.stat().st_size > 10_000
                                                         for p in (tmp_path / "scratch").rglob("*"))

    hub.reset_counts()
    again = mirror(root, "hf://acme/tiny", tmp_path)
    assert (again.uri, again.downloaded) == (first.uri, 0)
    assert hub.requests == [("GET", "/api/models/acme/tiny/revision/main")]  # resolving main, no file

    hub.reset_counts()
    pinned = mirror(root, f"hf://acme/tiny@{sha}", tmp_path)
    assert (pinned.uri, pinned.downloaded) == (first.uri, 0)
    assert hub.requests == []  # a pinned commit already mirrored needs no Hub at all


def test_a_new_commit_is_a_new_mirror_beside_the_old(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "store"
    old = mirror(root, "hf://acme/tiny", tmp_path)
    files = model_files()
    files["config.json"] = json.dumps({**MISTRAL_CONFIG, "num_hidden_layers": 3}).encode()
    new_sha = hub.repo("model", "acme/tiny").commit(files)
    new = mirror(root, "hf://acme/tiny", tmp_path)
    assert new.sha == new_sha != old.sha
    assert json.loads((Path(new.uri) / "config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((Path(old.uri) / "config.json").read_text())["num_hidden_layers"] == 2
    hub.reset_counts()
    assert mirror(root, f"hf://acme/tiny@{old.sha}", tmp_path).downloaded == 0
    assert hub.requests == []


def test_an_interrupted_mirror_is_never_used_and_resumes_without_fetching_good_files(
        hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "store"
    repo = hub.repo("model", "acme/tiny")
    repo.withheld = {"model-00002-of-00002.safetensors"}
    with pytest.raises(HubError) as info:
        mirror(root, "hf://acme/tiny", tmp_path)
    assert "model.uri hf://acme/tiny: a file the repository lists is missing on the Hub" in str(info.value)
    sha = repo.refs["main"]
    assert not Path(hub_model_marker(str(root), "acme", "tiny", sha)).exists()
    assert (Path(hub_model_uri(str(root), "acme", "tiny", sha)) / "model-00001-of-00002.safetensors").exists()

    repo.withheld = set()
    hub.reset_counts()
    done = mirror(root, "hf://acme/tiny", tmp_path)
    fetched = hub.file_downloads("acme/tiny")
    assert "model-00002-of-00002.safetensors" in fetched
    assert "model-00001-of-00002.safetensors" not in fetched  # checked against the Hub's sha256 in storage, kept
    assert Path(done.marker).exists()
    assert set(json.loads(Path(done.marker).read_text())["files"]) == MIRRORED


def test_the_mirror_lives_on_s3_too(hub: FakeHub, tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/pipelora"
    ref = parse_hub_uri("hf://acme/tiny", field="model.uri", kind="model")
    storage = open_storage(root, endpoint_url=s3_endpoint)
    done = mirror_model(ref, storage=storage, storage_uri=root, scratch=tmp_path / "scratch", log=lambda line: None)
    assert done.uri == f"{root}/_hub/models/acme/tiny/{done.sha}"
    shard = hub.repo("model", "acme/tiny").commits[done.sha]["model-00001-of-00002.safetensors"]
    assert storage.read_range(f"{done.uri}/model-00001-of-00002.safetensors", 1000, 64) == shard[1000:1064]
    assert storage.verify_committed(done.marker)["sha"] == done.sha
    hub.reset_counts()
    assert mirror_model(ref, storage=storage, storage_uri=root, scratch=tmp_path / "s2",
                        log=lambda line: None).downloaded == 0
    assert hub.file_downloads("acme/tiny") == []


def test_a_repository_without_safetensors_is_refused_before_any_download(hub: FakeHub, tmp_path: Path) -> None:
    files = {k: v for k, v in model_files().items() if not k.endswith(".safetensors") and "index" not in k}
    hub.add_repo("model", "acme/bin-only", files)
    with pytest.raises(HubError) as info:
        mirror(tmp_path / "store", "hf://acme/bin-only", tmp_path)
    assert str(info.value).startswith("model.uri hf://acme/bin-only (commit ")
    assert "has no safetensors weights" in str(info.value) and "pytorch_model.bin" in str(info.value)
    assert hub.file_downloads("acme/bin-only") == []


# -- one sentence per failure ------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "uri", "says"), [
    ("bad-token", "hf://acme/tiny",
     "model.uri hf://acme/tiny: the Hugging Face Hub refused the token in HF_TOKEN (401: invalid credentials); "
     "replace it with a valid token"),
    ("gated", "hf://acme/gated",
     "model.uri hf://acme/gated: acme/gated is gated on the Hugging Face Hub and the account of the token in "
     "HF_TOKEN has not been granted access; accept its terms at {endpoint}/acme/gated"),
    ("gated-no-token", "hf://acme/gated",
     "model.uri hf://acme/gated: acme/gated is gated on the Hugging Face Hub and no token is set; accept its terms "
     "at {endpoint}/acme/gated and put that account's token in HF_TOKEN"),
    ("missing", "hf://acme/nope",
     "model.uri hf://acme/nope: the Hugging Face Hub at {endpoint} has no model repository acme/nope that can be "
     "read; check the name"),
    ("missing-no-token", "hf://acme/nope",
     "model.uri hf://acme/nope: the Hugging Face Hub at {endpoint} has no model repository acme/nope that can be "
     "read; check the name (hf://<org>/<name>[@<revision>]), or if it is private, set HF_TOKEN"),
    ("revision", "hf://acme/tiny@v9",
     "model.uri hf://acme/tiny@v9: acme/tiny has no branch, tag or commit 'v9' on the Hugging Face Hub"),
    ("offline", "hf://acme/tiny", "model.uri hf://acme/tiny: cannot reach the Hugging Face Hub at "
     "http://127.0.0.1:{port} (ConnectError"),
])
def test_each_hub_failure_is_one_sentence_and_leaves_no_mirror(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, uri: str, says: str) -> None:
    port = free_port()
    if case == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    elif case == "gated":
        monkeypatch.setenv("HF_TOKEN", UNGRANTED)
    elif case.endswith("no-token"):
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no saved login either
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    elif case == "offline":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    endpoint = hubmod.endpoint()
    with pytest.raises(HubError) as info:
        mirror(tmp_path / "store", uri, tmp_path)
    message = str(info.value)
    assert message.startswith(says.format(endpoint=endpoint, port=port)), message
    assert "\n" not in message and "Traceback" not in message
    assert not list((tmp_path / "store").rglob(HUB_MARKER))


def test_gated_with_access_is_mirrored(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert mirror(tmp_path / "store", "hf://acme/gated", tmp_path).files == len(MIRRORED)


@pytest.mark.parametrize(("uri", "says"), [
    ("hf://datasets/acme/none", "dataset.uri hf://datasets/acme/none: the Hugging Face Hub at {endpoint} has no "
                                "dataset repository acme/none that can be read"),
    ("hf://datasets/acme/alpaca@nope", "dataset.uri hf://datasets/acme/alpaca@nope: acme/alpaca has no branch, tag "
                                       "or commit 'nope'"),
])
def test_dataset_resolution_failures_are_one_sentence(hub: FakeHub, tmp_path: Path, uri: str, says: str) -> None:
    from pipelora.dataprep.hubsource import open_hub_dataset

    with pytest.raises(HubError) as info:
        open_hub_dataset(uri, scratch=tmp_path)
    assert str(info.value).startswith(says.format(endpoint=hubmod.endpoint()))


def test_a_dataset_resolves_to_its_commit(hub: FakeHub, tmp_path: Path) -> None:
    from pipelora.dataprep.hubsource import open_hub_dataset

    found = open_hub_dataset("hf://datasets/acme/alpaca#train", scratch=tmp_path)
    assert found.sha == hub.repo("dataset", "acme/alpaca").refs["main"]
    assert found.identity == f"hf://datasets/acme/alpaca@{found.sha}#train"


# -- what the other steps read: storage, never the Hub -------------------------------------------------


def test_the_trainer_side_finds_the_mirror_through_the_manifest_only(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    spec = spec_from_dict(spec_tree("hf://acme/tiny", storage=str(root)))
    with pytest.raises(HubError, match=r"^model.uri is hf://acme/tiny, which the dataprep step mirrors into storage"):
        model_storage_uri(spec)
    done = mirror(root, "hf://acme/tiny", tmp_path)
    storage = open_storage(str(root))
    storage.commit(spec.layout.manifest, [], {"model": done.as_manifest("hf://acme/tiny")})
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # no Hub from here on
    hub.reset_counts()
    assert model_storage_uri(spec) == done.uri
    other = spec_from_dict(spec_tree("hf://acme/tiny@v2", storage=str(root)))
    with pytest.raises(HubError, match=r"prepared for hf://acme/tiny, not model.uri hf://acme/tiny@v2; run dataprep"):
        model_storage_uri(other)
    Path(done.marker).unlink()
    with pytest.raises(HubError, match=r"is missing or incomplete; run dataprep again"):
        model_storage_uri(spec)
    assert hub.requests == []
    assert hubmod.base_model_name("hf://acme/tiny@v2") == "acme/tiny"


def test_validate_reads_the_config_through_the_hub_before_dataprep(hub: FakeHub, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_from_dict(spec_tree("hf://acme/tiny", storage=str(tmp_path / "store")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_against_model(spec) is True
    assert hub.file_downloads("acme/tiny") == ["config.json"]
    assert not any(tmp_path.rglob("config.json"))  # nothing left behind

    hub.add_repo("model", "acme/gpt", {**model_files(), "config.json": b'{"model_type": "gpt2"}'})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        check_against_model(spec_from_dict(spec_tree("hf://acme/gpt", storage=str(tmp_path / "store"))))

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.warns(SpecWarning, match="could not check the model .*cannot reach the Hugging Face Hub"):
        assert check_against_model(spec) is False

