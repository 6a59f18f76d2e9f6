"""Runs a GGUF file in llama.cpp (llama-cpp-python, in .venv-llamacpp) for tests/test_gguf_integration.py.

Input (stdin, JSON): {"gguf": path, "prompts": [[token ids]], "max_new_tokens": n, "texts": [strings]}.
Output (stdout, JSON): {"generated": [[greedy token ids]], "tokens": [[llama.cpp's token ids of each text]]}.
"""

import json
import sys

from llama_cpp import Llama


def greedy(model: Llama, prompt: list[int], max_new_tokens: int) -> list[int]:
    model.reset()
    generated: list[int] = []
    for token in model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token == model.token_eos() or len(generated) == max_new_tokens:
            break
        generated.append(token)
    return generated


def main() -> None:
    request = json.load(sys.stdin)
    model = Llama(request["gguf"], n_ctx=1024, n_threads=2, verbose=False, seed=0)
    result = {
        "generated": [greedy(model, ids, request["max_new_tokens"]) for ids in request["prompts"]],
        # special=True: control tokens written in the text are parsed, as Hugging Face tokenizers do.
        "tokens": [model.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in request["texts"]],
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
