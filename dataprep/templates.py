"""Templates: examples → token ids and labels, a window at a time, as pure functions of a tokenizer.

`alpaca` is the Stanford Alpaca prompt, byte for byte. The prompt and the response are encoded
as separate pieces, so the prompt's tokens are exactly those a user's prompt gets at inference
and the mask boundary is exact. `chat` renders the tokenizer's own chat template and labels the
tokens that overlap an assistant message (and the EOS the template puts after it).
The encode functions need only a `tokenizers.Tokenizer`, so worker processes can run them
without importing transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from pipelora.dataprep.records import AlpacaExample, ChatExample, Example, RecordError, alpaca_as_chat
from pipelora.dataprep.tokens import TokenBatch
from pipelora.rows import IGNORE_INDEX

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

Span = tuple[int, int]


def alpaca_prompt(example: AlpacaExample) -> str:
    if example.input:
        return PROMPT_INPUT.format(instruction=example.instruction, input=example.input)
    return PROMPT_NO_INPUT.format(instruction=example.instruction)


def alpaca_texts(examples: Sequence[AlpacaExample]) -> list[str]:
    """Prompt and reply of each example, alternating: the pieces the encoder sees."""
    texts: list[str] = []
    for example in examples:
        texts.append(alpaca_prompt(example))
        texts.append(example.output)
    return texts


def encode_texts(backend: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All pieces' ids back to back (int32) and each piece's length: the encoder's work, nothing more."""
    # Offsets are only needed to find chat replies; skipping them halves the encoder's work.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    pieces = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def assemble_alpaca(
    flat: np.ndarray, piece_lengths: np.ndarray, *, bos: Sequence[int], eos: int, train_on_inputs: bool
) -> TokenBatch:
    """BOS + prompt + reply + EOS per example from alternating pieces; labels only on reply and EOS
    unless train_on_inputs. Whole-window numpy, so it costs little beside the encoder."""
    count = len(piece_lengths) // 2
    prompt_lengths = piece_lengths[0::2]
    body = prompt_lengths + piece_lengths[1::2]  # prompt and reply are adjacent in `flat`
    # BOS before each body and EOS after it, inserted in one pass (EOS_k before BOS_k+1 at equal index).
    nbos = len(bos)
    body_starts = np.cumsum(body) - body
    where = np.concatenate([np.repeat(body_starts, nbos), body_starts + body])
    rank = np.concatenate([np.tile(np.arange(nbos) + 1, count), np.zeros(count, dtype=np.int64)])
    values = np.concatenate([np.tile(np.asarray(bos, dtype=np.int32), count), np.full(count, eos, np.int32)])
    order = np.lexsort((rank, where))
    ids = np.insert(flat, where[order], values[order])
    lengths = body + nbos + 1
    starts = np.cumsum(lengths) - lengths
    masked = np.ones(count, dtype=np.int64) if train_on_inputs else np.maximum(nbos + prompt_lengths, 1)
    marks = np.zeros(len(ids) + 1, dtype=np.int8)
    marks[starts] = 1
    marks[starts + masked] = -1  # strictly inside each example: a reply has at least one token
    labels = np.where(np.cumsum(marks[:-1], dtype=np.int8) > 0, IGNORE_INDEX, ids).astype(np.int32)
    return TokenBatch(ids, labels, starts, lengths)


def encode_alpaca(
    backend: Any, examples: Sequence[AlpacaExample], *, bos: Sequence[int], eos: int, train_on_inputs: bool
) -> TokenBatch:
    """BOS + prompt + reply + EOS per example, in one process (the pieces are encoded separately)."""
    flat, piece_lengths = encode_texts(backend, alpaca_texts(examples))
    return assemble_alpaca(flat, piece_lengths, bos=bos, eos=eos, train_on_inputs=train_on_inputs)


def render_chat(tokenizer: Any, example: Example) -> tuple[str, list[Span]]:
    """The chat template's text and the character spans of the assistant replies in it."""
    chat = alpaca_as_chat(example) if isinstance(example, AlpacaExample) else example
    assert isinstance(chat, ChatExample)
    try:
        text = tokenizer.apply_chat_template(list(chat.messages), tokenize=False)
    except Exception as exc:  # jinja raises template-defined errors (e.g. roles out of order)
        raise RecordError(f"the chat template rejects it: {exc}") from None
    spans: list[Span] = []
    cursor = 0
    eos_text = tokenizer.eos_token or ""
    for message in chat.messages:
        if message["role"] != "assistant":
            # Step past each prompt message too, so a reply's text is never matched inside a question.
            found = text.find(message["content"], cursor)
            cursor = found + len(message["content"]) if found >= 0 else cursor
            continue
        start = text.find(message["content"], cursor)
        if start < 0:
            raise RecordError("the chat template does not render an assistant message verbatim")
        end = start + len(message["content"])
        while start > cursor and text[start - 1] == " ":  # the space before a reply is the reply's first token
            start -= 1
        if eos_text:
            rest = text[end:]
            gap = len(rest) - len(rest.lstrip(" \n"))
            if rest[gap:].startswith(eos_text):
                end += gap + len(eos_text)
        spans.append((start, end))
        cursor = end
    return text, spans


def encode_chat(backend: Any, rendered: Sequence[tuple[str, list[Span]]], *, train_on_inputs: bool) -> TokenBatch:
    """Rendered conversations → ids; labels on the tokens overlapping a reply span."""
    encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    pairs = []
    for (_, spans), encoding in zip(rendered, encodings, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        trainable = np.full(len(ids), train_on_inputs, dtype=bool)
        for start, end in spans:
            trainable |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        labels = np.where(trainable, ids, IGNORE_INDEX).astype(np.int32)
        if len(labels):  # never a target once packed (rows.mask_sequence_starts), so never counted
            labels[0] = IGNORE_INDEX
        pairs.append((ids, labels))
    return TokenBatch.from_pairs(pairs)
