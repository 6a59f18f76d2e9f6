"""Dataset rows in every chat format normalise to the same messages; errors name the row and column."""

import json
from pathlib import Path

import pytest

from tunewright.conversations import detect_format, from_messages, from_sharegpt, from_transcript, strip_reasoning
from tunewright.errors import DataError

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]
HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"


def test_openai_messages_and_json_string_cell():
    assert from_messages(EXPECTED) == EXPECTED
    assert from_messages(json.dumps(EXPECTED)) == EXPECTED


def test_tool_calls_are_kept():
    calls = [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    assert from_messages(messages)[1] == {"role": "assistant", "content": "", "tool_calls": calls}


def test_sharegpt_maps_speakers():
    rows = [
        {"from": f, "value": m["content"]}
        for f, m in zip(["system", "human", "gpt", "user", "bot"], EXPECTED, strict=True)
    ]
    assert from_sharegpt(rows) == EXPECTED
    tool = from_sharegpt(
        [{"from": "human", "value": "q"}, {"from": "observation", "value": "o"}, {"from": "assistant", "value": "a"}]
    )
    assert [m["role"] for m in tool] == ["user", "tool", "assistant"]


def test_transcript_default_hh_rlhf_markers():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    assert from_transcript(text) == EXPECTED[1:]


def test_transcript_custom_speaker_mapping():
    text = "### System: Be brief.\n### Q: hi\n### A: hello\n### Q: bye\n### A: see you"
    speakers = {"### System: ": "system", "### Q: ": "user", "### A: ": "assistant"}
    assert from_transcript(text, speakers=speakers) == EXPECTED


@pytest.mark.skipif(not HH_RLHF.is_file(), reason="shared hh-rlhf data not present")
def test_real_hh_rlhf_rows():
    lines = HH_RLHF.read_text(encoding="utf-8").splitlines()[:5]
    for index, line in enumerate(lines):
        messages = from_transcript(json.loads(line)["chosen"], row_index=index, column="chosen")
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        roles = [m["role"] for m in messages]
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), roles  # turns alternate
        assert all("\n\nHuman:" not in m["content"] for m in messages)


def test_detect_format_rule_order():
    assert detect_format(["messages", "conversations"], {}) == "messages"
    assert detect_format(["conversations", "id"], {}) == "sharegpt"
    assert detect_format(["chosen", "rejected"], {"chosen": "\n\nHuman: a\n\nAssistant: b"}) == "transcript"
    assert detect_format(["instruction", "output"], {"instruction": "a", "output": "b"}) == "columns"


def test_strip_reasoning_keeps_last_turn():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>x</think> a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>y</think>b"},
    ]
    out = strip_reasoning(messages)
    assert out[1]["content"] == "a" and out[3]["content"] == "<think>y</think>b"
    assert messages[1]["content"] == "<think>x</think> a"  # input untouched


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: from_messages([{"role": "robot", "content": "x"}], 4),
            "row 4, column 'messages': unknown role 'robot'",
        ),
        (lambda: from_messages([], 2), "row 2, column 'messages': empty or not a list"),
        (lambda: from_messages("{not json", 1), "row 1, column 'messages': not valid JSON"),
        (lambda: from_sharegpt([{"from": "alien", "value": "x"}], 3), "row 3, column 'conversations': unknown speaker"),
        (
            lambda: from_messages([{"role": "user", "content": "x"}], 5),
            "row 5, column 'messages': conversation ends with a 'user' turn; end it with an assistant turn",
        ),
        (lambda: from_transcript("no markers here", 6, "chosen"), "row 6, column 'chosen': no speaker markers"),
    ],
)
def test_errors_name_row_and_column(call, message):
    with pytest.raises(DataError) as raised:
        call()
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_prompt_only_conversation_allowed_when_not_required():
    assert from_messages([{"role": "user", "content": "x"}], require_assistant_last=False)[0]["role"] == "user"
