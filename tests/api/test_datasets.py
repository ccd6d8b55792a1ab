"""The pure JSON Lines check kubetune-server runs on each upload: the format detected from the
first record, the first bad line named."""

from __future__ import annotations

import json

import pytest

from kubetune.api.datasets import DatasetInvalid, check_jsonl

pytestmark = pytest.mark.unit


def lines(*records: object) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "messages"),
        ({"prompt": "a", "completion": "b"}, "prompt-completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "a b"}, "text"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"prompt": [{"role": "user", "content": "a"}],
          "chosen": [{"role": "assistant", "content": "b"}],
          "rejected": [{"role": "assistant", "content": "c"}]}, "preference"),
        ({"input": {"messages": [{"role": "user", "content": "a"}]},
          "preferred_output": [{"role": "assistant", "content": "b"}],
          "non_preferred_output": [{"role": "assistant", "content": "c"}]},
         "openai-preference"),
    ],
)  # fmt: skip
def test_the_format_is_detected_from_the_first_record(record: object, fmt: str) -> None:
    summary = check_jsonl(lines(record, record, ""))
    assert (summary.format, summary.examples) == (fmt, 2)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "a JSON object is expected, found a list"),
        ({"prompt": "a"}, "no 'completion' field"),
        ({"prompt": "a", "completion": None}, "completion is null; it must be text"),
        # Each an uncaught error before (a 500 from kubetune-server's upload).
        ('{"text": ' + "[" * 65 + "]" * 65 + "}", "nests arrays and objects more than 64 deep"),
        ('{"text": ' + "[" * 5000 + "]" * 5000 + "}", "more than 64 deep"),
        ('{"text": ' + "9" * 5000 + "}", "too deep or too long"),
    ],
)
def test_the_first_bad_line_is_named(bad: object, says: str) -> None:
    good = {"prompt": "a", "completion": "b"}
    with pytest.raises(DatasetInvalid) as refused:
        check_jsonl(lines(good, good, bad, bad))
    assert refused.value.line == 3
    assert str(refused.value).startswith("line 3: ")
    assert says in str(refused.value)


def test_a_chat_must_end_with_the_assistant() -> None:
    chat = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(DatasetInvalid, match="line 1: the last message must be the assistant's"):
        check_jsonl(lines(chat))


def test_unknown_fields_and_empty_files_are_refused() -> None:
    with pytest.raises(DatasetInvalid, match="line 1: cannot detect the record format"):
        check_jsonl(lines({"question": "a", "answer": "b"}))
    with pytest.raises(DatasetInvalid, match="no records"):
        check_jsonl(lines("", "  "))
    with pytest.raises(DatasetInvalid, match="line 2: not UTF-8"):
        check_jsonl([b'{"text": "a"}\n', b'{"text": "\xff"}\n'])


OPENAI_PAIR = {
    "input": {"messages": [{"role": "user", "content": "a"}]},
    "preferred_output": [{"role": "assistant", "content": "b"}],
    "non_preferred_output": [{"role": "assistant", "content": "c"}],
}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({**OPENAI_PAIR, "input": "a"}, "input is text; it must be {messages}"),
        ({**OPENAI_PAIR, "preferred_output": "b"}, "preferred_output is text; it must be"),
        ({**OPENAI_PAIR, "non_preferred_output": [{"role": "user", "content": "c"}]},
         "non_preferred_output: the last message must be the assistant's"),
        ({"input": OPENAI_PAIR["input"], "preferred_output": OPENAI_PAIR["preferred_output"]},
         "no 'non_preferred_output' field"),
    ],
)  # fmt: skip
def test_a_bad_preference_pair_is_named_by_its_line(bad: object, says: str) -> None:
    with pytest.raises(DatasetInvalid) as refused:
        check_jsonl(lines(OPENAI_PAIR, bad))
    assert refused.value.line == 2
    assert says in str(refused.value)


def test_openais_pairs_become_the_trainers_chat_pairs() -> None:
    from kubetune.api.datasets import openai_pair

    assert openai_pair(OPENAI_PAIR) == {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
    }
