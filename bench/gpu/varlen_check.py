"""Packed rows through torch's varlen flash attention on CUDA give what each sample alone gives.

A small random Llama with grouped heads in bf16: the hidden states of one packed row (the kernel, one
call per layer) against each sample run alone (plain SDPA), and the input gradients the same way.
Also checks that the kernel ran, not the per-span fallback. One JSON line out; exit 1 on a mismatch.

    python bench/gpu/varlen_check.py [OUT_JSON]
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunewright.kernels import attention
from tunewright.kernels.attention import packed_attention, torch_varlen_attention, varlen_kwargs

BF16_RTOL = 2e-2  # bf16 activations through 4 layers: the relative error of the whole hidden state


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def main(out: str | None) -> int:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    lengths = [37, 200, 5, 128, 64]
    ids = torch.randint(3, 512, (1, sum(lengths)), device="cuda")
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    calls = []
    kernel = torch_varlen_attention()
    if kernel is not None:
        monitored = kernel

        def kernel(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(1)
            return monitored(*args, **kwargs)

        attention.torch_varlen_attention = lambda: kernel

    def embeddings() -> torch.Tensor:
        return model.get_input_embeddings()(ids).detach().requires_grad_()

    packed_inputs = embeddings()
    with packed_attention(model):
        packed = model.model(inputs_embeds=packed_inputs, position_ids=positions, **varlen_kwargs(bounds))
    cotangent = torch.randn_like(packed.last_hidden_state)  # one fixed direction for both backward passes
    packed.last_hidden_state.backward(cotangent)
    alone_inputs = embeddings()
    pieces = [model.model(inputs_embeds=piece).last_hidden_state
              for piece in torch.split(alone_inputs, lengths, dim=1)]
    alone = torch.cat(pieces, dim=1)
    alone.backward(cotangent)
    result = {"kernel_found": kernel is not None, "kernel_calls": len(calls), "layers": config.num_hidden_layers,
              "hidden_relative_error": relative_error(packed.last_hidden_state, alone),
              "input_grad_relative_error": relative_error(packed_inputs.grad, alone_inputs.grad),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    result["ok"] = (len(calls) == config.num_hidden_layers and result["hidden_relative_error"] < BF16_RTOL
                    and result["input_grad_relative_error"] < BF16_RTOL)
    line = json.dumps(result)
    print(line)
    if out:
        with open(out, "w", encoding="utf-8") as stream:
            stream.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
