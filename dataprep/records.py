"""Raw records → validated examples of one format, or the reason a record is unusable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(slots=True)
class AlpacaExample:
    instruction: str
    input: str
    output: str


@dataclass(slots=True)
class ChatExample:
    messages: tuple[dict[str, str], ...]


Example = AlpacaExample | ChatExample


class RecordError(ValueError):
    """Why one record is unusable (a short phrase; the caller adds where it is)."""


def _string(record: dict[str, Any], key: str, *, required: bool) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing key '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"'{key}' is a {type(value).__name__}, not a string")
    return value


def alpaca_example(record: Any) -> AlpacaExample:
    """`instruction`, optional `input`, `output`: the Stanford Alpaca record."""
    if type(record) is dict:  # the common, valid record in a few checks; anything else gets the full ones
        instruction, text_input, output = record.get("instruction"), record.get("input"), record.get("output")
        if (type(instruction) is str and type(output) is str and (text_input is None or type(text_input) is str)
                and instruction and output and not instruction.isspace() and not output.isspace()):
            return AlpacaExample(instruction, text_input or "", output)
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object with instruction/input/output")
    instruction = _string(record, "instruction", required=True)
    text_input = _string(record, "input", required=False)
    output = _string(record, "output", required=True)
    if not instruction or instruction.isspace():  # isspace: no copy of a long string, unlike strip
        raise RecordError("empty instruction")
    if not output or output.isspace():
        raise RecordError("empty output")
    return AlpacaExample(instruction=instruction, input=text_input, output=output)


def chat_example(record: Any) -> ChatExample:
    """`messages`: a list of {role, content} with system/user/assistant; at least one assistant turn."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object with a 'messages' list")
    if "messages" not in record:
        raise RecordError("missing key 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise RecordError(f"'messages' is a {type(messages).__name__}, not a list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}] is a {type(message).__name__}, not an object with role/content")
        for key in ("role", "content"):
            if key not in message:
                raise RecordError(f"messages[{i}] has no '{key}'")
            if not isinstance(message[key], str):
                raise RecordError(f"messages[{i}].{key} is a {type(message[key]).__name__}, not a string")
        if message["role"] not in ROLES:
            raise RecordError(f"messages[{i}].role is '{message['role']}'; use system, user or assistant")
        out.append({"role": message["role"], "content": message["content"]})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no assistant message")
    if any(not m["content"] or m["content"].isspace() for m in assistant):
        raise RecordError("empty assistant message")
    return ChatExample(messages=tuple(out))


def alpaca_as_chat(example: AlpacaExample) -> ChatExample:
    """An Alpaca record as one user turn and one assistant turn, for `template: chat`."""
    user = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    return ChatExample(messages=({"role": "user", "content": user}, {"role": "assistant", "content": example.output}))


def parse_record(record: Any, *, fmt: str) -> Example:
    return alpaca_example(record) if fmt == "alpaca" else chat_example(record)
