"""Pure checks of a JSON Lines dataset: the format detected from its fields and the first bad line
named, as the Validating phase names it, without the training stack (kubetune-server checks each
upload with it before a job can name the file).

The trainer's own checks (``kubetune.trainer.dataset.formats``) go further (tokenizing, chat
templates); what is refused here is what the trainer refuses too: a line that isn't a JSON object,
a record without the fields of the detected format, a field that must be text and isn't, a chat
whose last turn isn't the assistant's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubetune.api.documents import MAX_DEPTH

#: The fields each record format needs, most specific first (the trainer detects in this order).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    # Preference pairs (DPO): the trainer's own, text or chat, and OpenAI's DPO file format
    # (kubetune-server hands the trainer OpenAI's as the trainer's chat pairs: openai_pair).
    "preference": ("prompt", "chosen", "rejected"),
    "openai-preference": ("input", "preferred_output", "non_preferred_output"),
}
#: The formats supervised training takes; the rest are preference pairs.
SUPERVISED_FORMATS = frozenset({"messages", "prompt-completion", "alpaca", "text"})
#: Deepest nesting of arrays and objects a JSON line may have, as for any document someone else
#: wrote: a chat record is 3 deep, one with multimodal parts or tool calls a few more; thousands
#: deep is an attack on the parser.
MAX_JSON_DEPTH = MAX_DEPTH
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class DatasetInvalid(ValueError):
    """A dataset that can't be trained on; ``line`` is the 1-based line at fault (None: the whole
    file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class DatasetSummary:
    """What a valid JSON Lines dataset holds."""

    format: str
    examples: int


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "text"


def json_depth(line: str) -> int:
    """How deeply arrays and objects nest in one line of JSON (strings are skipped)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub('""', line)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def too_deep(line: str) -> bool:
    """Whether a line of JSON nests arrays and objects past ``MAX_JSON_DEPTH``. Counting brackets
    is cheap; only a line with many of them is measured exactly."""
    return line.count("[") + line.count("{") > MAX_JSON_DEPTH and json_depth(line) > MAX_JSON_DEPTH


def detect_format(fields: Iterable[str]) -> str | None:
    """The format a record's fields imply, most specific first; None when none fits."""
    present = set(fields)
    for fmt, needed in FORMAT_FIELDS.items():
        if all(name in present for name in needed):
            return fmt
    return None


def _check_messages(messages: Any, name: str, line: int) -> None:
    """A non-empty list of {role, content} objects with text in both."""
    if not isinstance(messages, list) or not messages:
        raise DatasetInvalid(
            f"{name} is {_describe(messages)}; it must be a non-empty list of "
            "{role, content} objects",
            line,
        )
    where = "" if name == "messages" else f"{name}: "
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetInvalid(f"{where}message {number} is not a {{role, content}} object", line)
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise DatasetInvalid(
                    f"{where}the {key} of message {number} is {_describe(message[key])}; "
                    "it must be text",
                    line,
                )


def _check_assistant_answer(messages: list[dict[str, Any]], name: str, line: int) -> None:
    if messages[-1]["role"] != "assistant":
        where = "" if name == "messages" else f"{name}: "
        raise DatasetInvalid(
            f"{where}the last message must be the assistant's, or there is nothing to learn", line
        )


def _check_pair(record: dict[str, Any], fmt: str, line: int) -> None:
    """A preference pair: the prompt (text or chat) and two answers of the same kind."""
    if fmt == "openai-preference":
        prompt = record["input"]
        if not isinstance(prompt, dict) or "messages" not in prompt:
            raise DatasetInvalid(f"input is {_describe(prompt)}; it must be {{messages}}", line)
        _check_messages(prompt["messages"], "input.messages", line)
        chosen, rejected = "preferred_output", "non_preferred_output"
    else:
        chosen, rejected = "chosen", "rejected"
        if isinstance(record["prompt"], list):
            _check_messages(record["prompt"], "prompt", line)
        elif not isinstance(record["prompt"], str):
            raise DatasetInvalid(
                f"prompt is {_describe(record['prompt'])}; it must be text or a list of "
                "{role, content} objects",
                line,
            )
    as_chat = fmt == "openai-preference" or isinstance(record["prompt"], list)
    for name in (chosen, rejected):
        answer = record[name]
        if as_chat:
            _check_messages(answer, name, line)
            _check_assistant_answer(answer, name, line)
        elif not isinstance(answer, str):
            raise DatasetInvalid(f"{name} is {_describe(answer)}; it must be text", line)


def _check_record(record: dict[str, Any], fmt: str, line: int) -> None:
    for name in FORMAT_FIELDS[fmt]:
        if name not in record:
            raise DatasetInvalid(
                f"no {name!r} field; the file's first record is {fmt} "
                f"({', '.join(FORMAT_FIELDS[fmt])})",
                line,
            )
    if fmt == "messages":
        _check_messages(record["messages"], "messages", line)
        _check_assistant_answer(record["messages"], "messages", line)
        return
    if fmt not in SUPERVISED_FORMATS:
        _check_pair(record, fmt, line)
        return
    for name in FORMAT_FIELDS[fmt]:
        if not isinstance(record[name], str):
            raise DatasetInvalid(f"{name} is {_describe(record[name])}; it must be text", line)
    if fmt == "alpaca" and record.get("input") is not None and not isinstance(record["input"], str):
        raise DatasetInvalid(f"input is {_describe(record['input'])}; it must be text", line)


def check_jsonl(lines: Iterable[bytes]) -> DatasetSummary:
    """Check a JSON Lines file line by line: every non-blank line one JSON object of the format
    its first record implies. Raises :class:`DatasetInvalid` naming the first bad line; the
    message quotes nothing of the data but field names kubetune defines."""
    fmt: str | None = None
    examples = 0
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetInvalid("not UTF-8 text", number) from None
        if not text.strip():
            continue
        if too_deep(text):
            raise DatasetInvalid(
                f"the record nests arrays and objects more than {MAX_JSON_DEPTH} deep", number
            )
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetInvalid(f"not valid JSON ({exc.msg})", number) from None
        except (ValueError, RecursionError):
            # A number of over 4,300 digits, or arrays and objects nested past Python's limit.
            raise DatasetInvalid(
                "not JSON that can be read (too deep or too long)", number
            ) from None
        if not isinstance(record, dict):
            raise DatasetInvalid(f"a JSON object is expected, found {_describe(record)}", number)
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                raise DatasetInvalid(
                    "cannot detect the record format: expected messages, prompt+completion, "
                    "instruction+output, text, or preference pairs (prompt+chosen+rejected, or "
                    "input+preferred_output+non_preferred_output)",
                    number,
                )
        _check_record(record, fmt, number)
        examples += 1
    if fmt is None:
        raise DatasetInvalid("the file holds no records")
    return DatasetSummary(format=fmt, examples=examples)


def openai_pair(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's DPO record as the trainer's chat preference pair (prompt, chosen, rejected)."""
    return {
        "prompt": record["input"]["messages"],
        "chosen": record["preferred_output"],
        "rejected": record["non_preferred_output"],
    }
