"""A conversation run of the real smollm2-135m, served by `tunewright serve`, holds a three-turn chat through
the official `openai` client: every reply ends on the trained end-of-turn token (finish_reason "stop"), and the
server reads exactly the prompt that predict renders for the same history.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from test_serve_e2e import API_KEY, start_server, stop

import tunewright

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chat"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text(encoding="utf-8"))
    config["trainer"] = {**config["trainer"], "max_steps": 24, "precision": "fp32"}
    config["generation"] = {"max_new_tokens": 48}
    run = tmp_path_factory.mktemp("chat-e2e") / "run"
    tunewright.train(config, EXAMPLE / "train.jsonl", run, show_progress=False)
    return run


def test_three_turn_conversation_through_the_openai_client(chat_run: Path, tmp_path: Path) -> None:
    process, url = start_server({"pip": chat_run}, tmp_path / "server.log")
    tuned = tunewright.load(chat_run)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        messages: list[dict[str, str]] = []
        for question in ["What is the capital of France?", "And of Italy?", "Thanks!"]:
            messages.append({"role": "user", "content": question})
            reply = client.chat.completions.create(model="pip", messages=messages, max_tokens=48, temperature=0)
            choice = reply.choices[0]
            assert choice.finish_reason == "stop", choice  # the end-of-turn token stopped it, not max_tokens
            assert choice.message.content and choice.message.content.strip()
            assert reply.usage is not None
            assert reply.usage.prompt_tokens == len(tuned.encode_conversations([messages])[0])
            expected = tunewright.predict(tuned, [{"messages": [*messages]}])["prediction"][0]
            assert choice.message.content.strip() == expected
            messages.append({"role": "assistant", "content": choice.message.content})
    finally:
        assert stop(process) == 0
