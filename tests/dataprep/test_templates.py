"""Exact token ids and loss masks for a few records, worked out from the template pieces by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipelora.dataprep import open_shards
from pipelora.dataprep.pipeline import run_dataprep

BOS, EOS = 1, 2
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 + 3\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a primary colour.\n\n### Response:"
)


def single_rows(spec):
    """Rows of a one-example-per-row run, as lists trimmed at the padding."""
    run_dataprep(spec)
    ds = open_shards(spec.layout.data)
    out = []
    for i in range(len(ds)):
        row = ds[i]
        n = int(np.argmax(row["position_ids"][1:] == 0)) + 1 if (row["position_ids"][1:] == 0).any() else len(row["position_ids"])
        out.append({k: v[:n].tolist() for k, v in row.items()})
    return out


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_alpaca_prompt_tokens_and_mask(tokenizer, write_jsonl, make_spec, train_on_inputs):
    records = [
        {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Name a primary colour.", "output": "Red"},  # `input` absent
    ]
    spec = make_spec(write_jsonl(records), packing=False, train_on_inputs=train_on_inputs)
    rows = single_rows(spec)
    assert len(rows) == 2
    by_len = {len(r["input_ids"]): r for r in rows}

    for prompt, output in ((PROMPT_WITH_INPUT, "5"), (PROMPT_NO_INPUT, "Red")):
        p, r = encode(tokenizer, prompt), encode(tokenizer, output)
        expected_ids = [BOS, *p, *r, EOS]
        row = by_len[len(expected_ids)]
        assert row["input_ids"] == expected_ids
        if train_on_inputs:
            assert row["labels"] == [-100, *p, *r, EOS]
        else:
            assert row["labels"] == [-100] * (1 + len(p)) + [*r, EOS]
        assert row["position_ids"] == list(range(len(expected_ids)))

    # The prompt ends in "### Response:" exactly; the reply follows as its own piece.
    row = by_len[len(encode(tokenizer, PROMPT_WITH_INPUT)) + 4]
    tail = tokenizer.convert_ids_to_tokens(row["input_ids"][-6:])
    assert tail == ["###", "▁Response", ":", "▁", "5", "</s>"]
    assert row["input_ids"][-6:] == [27332, 12107, 28747, 28705, 28782, 2]


def test_padding_is_its_own_segment(write_jsonl, make_spec):
    spec = make_spec(write_jsonl([{"instruction": "Say hi.", "output": "hi"}]), packing=False, seq_len=128)
    run_dataprep(spec)
    row = open_shards(spec.layout.data)[0]
    n = int(np.flatnonzero(row["input_ids"] == EOS)[0]) + 1
    assert (row["input_ids"][n:] == EOS).all()  # Mistral has no pad token: EOS pads
    assert (row["labels"][n:] == -100).all()
    assert row["position_ids"][n:].tolist() == list(range(128 - n))


def test_chat_multi_turn_labels_every_assistant_turn(tokenizer, write_jsonl, make_spec):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sum 2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    spec = make_spec(write_jsonl([{"messages": messages}]), format="messages", template="chat", packing=False)
    (row,) = single_rows(spec)
    text = "<s>[INST] You are terse.\n\nHi [/INST] Hello</s>[INST] Sum 2 and 3 [/INST] 5</s>"
    assert row["input_ids"] == encode(tokenizer, text)
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    labelled = [t for t, label in zip(tokens, row["labels"], strict=True) if label != -100]
    assert labelled == ["▁Hello", "</s>", "▁", "5", "</s>"]
    trained = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert trained == [22557, 2, 28705, 28782, 2]


def test_chat_template_on_alpaca_records(tokenizer, write_jsonl, make_spec):
    record = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
    spec = make_spec(write_jsonl([record]), format="alpaca", template="chat", packing=False)
    (row,) = single_rows(spec)
    assert row["input_ids"] == encode(tokenizer, "<s>[INST] Add the two numbers.\n\n2 + 3 [/INST] 5</s>")
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert [t for t, lab in zip(tokens, row["labels"], strict=True) if lab != -100] == ["▁", "5", "</s>"]
