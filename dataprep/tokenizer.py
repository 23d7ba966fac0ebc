"""The tokenizer: written into model folders, fetched from them, and summarised for the manifest.

Only the tokenizer files are fetched from `model.uri` (never the weights), so the dataprep Job
needs a few kilobytes from S3, not 14 GB.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pipelora.dataprep.errors import DataprepError
from pipelora.hub import TOKENIZER_FILES  # the files a tokenizer is made of (one list)
from pipelora.storage import Storage, is_s3, join_uri, local_path

# Mistral's [INST] format; a system message is put before the first user turn (Mistral v0.1
# itself has no system role, and Alpaca-style datasets often carry one).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}[INST] {{ ns.system + message['content'] }} [/INST]"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    """What shards depend on: special ids, and a digest of the files (part of the fingerprint)."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    digest: str

    def as_manifest(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "digest": self.digest}


def write_mistral_tokenizer(folder: str | Path) -> Path:
    """Write the Mistral-7B v0.1 tokenizer (shipped by `mistral-common`) into `folder`.

    Model folders made here (random-weight test models, the demo) get the real tokenizer so that
    token ids, masks and lengths are those of a real Mistral run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with resources.as_file(source) as path:
        shutil.copyfile(path, folder / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "model_max_length": 32768,
        "chat_template": MISTRAL_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder


def fetch_tokenizer_files(storage: Storage, model_uri: str, *, dest: Path | None = None) -> Path:
    """A local folder holding the tokenizer files of `model_uri` (downloaded when it is on S3)."""
    if not is_s3(model_uri):
        folder = local_path(model_uri)
        if not folder.is_dir():
            raise DataprepError(f"model folder {model_uri} does not exist; set model.uri to a Hugging Face model folder")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise DataprepError(
                f"model folder {model_uri} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
                "copy them from the model's Hugging Face repository"
            )
        return folder
    dest = dest or Path(tempfile.mkdtemp(prefix="pipelora-tokenizer-"))
    found = 0
    for name in TOKENIZER_FILES:
        uri = join_uri(model_uri, name)
        if storage.exists(uri):
            storage.download_file(uri, dest / name)
            found += 1
    if not found:
        raise DataprepError(
            f"model folder {model_uri} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
            "upload them with the weights"
        )
    return dest


def tokenizer_digest(folder: Path) -> str:
    """sha256 over the tokenizer files' names and bytes: a changed vocabulary changes every shard."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(folder: Path) -> Any:
    """A fast (Rust) tokenizer from `folder`; the batch encoder is what makes dataprep fast."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for broken folders
        raise DataprepError(f"cannot load the tokenizer from {folder}: {type(exc).__name__}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataprepError(
            f"the tokenizer in {folder} has no fast (Rust) implementation; add a tokenizer.json to the model folder"
        )
    if tokenizer.eos_token_id is None:
        raise DataprepError(f"the tokenizer in {folder} has no EOS token; set eos_token in tokenizer_config.json")
    return tokenizer


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts before a text (BOS for Llama/Mistral; none for some models).

    Asked of the tokenizer rather than read from `add_bos_token`, whose meaning differs between
    tokenizer.json and SentencePiece-only folders.
    """
    marked = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(marked) - len(plain) + 1):
        if marked[i : i + len(plain)] == plain:
            return marked[:i]
    return []


def tokenizer_info(tokenizer: Any, folder: Path) -> TokenizerInfo:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix = special_prefix(tokenizer)
    bos = prefix[0] if prefix else None
    return TokenizerInfo(bos_id=bos, eos_id=int(tokenizer.eos_token_id), pad_id=int(pad), digest=tokenizer_digest(folder))
