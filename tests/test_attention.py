"""Per-sample (varlen) SDPA for packed rows gives what masked SDPA gives, without cross-sample work.

Tolerance: fp32; hidden states agree to 1e-5 and gradients to a relative 1e-4 of their norm
(only the summation order of differently shaped kernels differs). The CPU bf16 span attention is
held to PyTorch's own bf16 attention error instead (its test states the bound).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_packing import GRAD_RTOL, gradients, lora_objective, make_example, random_examples

from tunewright.config import TrainerConfig
from tunewright.data import Example, collate_training
from tunewright.kernels.attention import (
    MASKED_ROW_TOKENS,
    VARLEN_SDPA,
    _BF16SpanAttention,
    packed_attention,
    packed_row_capacity,
)
from tunewright.objective import hidden_states
from tunewright.packing import collate_packed
from tunewright.train import fit


@pytest.fixture
def examples() -> list[Example]:
    return random_examples()


def test_collate_packed_gives_one_row_and_sample_boundaries(examples) -> None:
    batch = collate_packed(examples, pad_id=0)
    lengths = sorted((len(e.input_ids) for e in examples), reverse=True)  # first-fit-decreasing order
    assert batch["input_ids"].shape == (1, sum(lengths))  # no padding at all
    assert batch["cu_seq_lens"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert "cu_seq_lens" not in collate_packed(examples, pad_id=0, capacity=20)  # several rows: mask path


def test_varlen_hidden_states_equal_masked_and_separate(tiny_model, examples) -> None:
    batch = collate_packed(examples, pad_id=0)
    with torch.no_grad():
        masked = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"])
        with packed_attention(tiny_model):
            varlen = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
        edges = batch["cu_seq_lens"].tolist()
        spans = zip(edges[:-1], edges[1:], strict=True)
        alone = torch.cat([hidden_states(tiny_model, batch["input_ids"][:, a:b], None) for a, b in spans], dim=1)
    assert torch.allclose(varlen, masked, atol=1e-5)
    assert torch.allclose(varlen, alone, atol=1e-5)


def assert_packed_gradients_equal_padded(objective, examples: list[Example]) -> None:
    """Loss and LoRA gradients of one packed row (varlen attention) equal those of padded rows."""
    with packed_attention(objective.model):
        packed_loss, packed_grads = gradients(objective, collate_packed(examples, pad_id=0))
        padded_loss, padded_grads = gradients(objective, collate_training(examples, pad_id=0))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for name, grad in padded_grads.items():
        assert torch.linalg.norm(packed_grads[name] - grad) <= GRAD_RTOL * torch.linalg.norm(grad), name


def test_varlen_gradients_equal_padded(tiny_model, examples) -> None:
    assert_packed_gradients_equal_padded(lora_objective(tiny_model), examples)


def test_padded_batches_keep_their_mask_under_varlen(tiny_model) -> None:
    """Evaluation batches (right-padded, with a mask, no boundaries) take plain SDPA unchanged."""
    batch = collate_training([make_example([5, 6, 7], [8, 2]), make_example([9], [4])], pad_id=0)
    with torch.no_grad():
        plain = hidden_states(tiny_model, batch["input_ids"], batch["attention_mask"])
        with packed_attention(tiny_model):
            switched = hidden_states(tiny_model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(plain, switched)


def test_packed_attention_switches_sdpa_only_and_restores(tiny_model) -> None:
    assert tiny_model.config._attn_implementation == "sdpa"
    with packed_attention(tiny_model):
        assert tiny_model.config._attn_implementation == VARLEN_SDPA
    assert tiny_model.config._attn_implementation == "sdpa"
    tiny_model.set_attn_implementation("eager")  # eager keeps its block-diagonal mask
    with packed_attention(tiny_model):
        assert tiny_model.config._attn_implementation == "eager"


def test_fit_trains_packed_rows_with_varlen_attention(tiny_model, examples) -> None:
    objective = lora_objective(tiny_model)
    seen: list[str] = []
    hook = tiny_model.model.register_forward_pre_hook(
        lambda module, *_: seen.append(module.config._attn_implementation))
    cfg = TrainerConfig(max_steps=2, batch_size=3, learning_rate=0.01, packing=True)
    fit(objective, examples, examples[:2], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    hook.remove()
    assert VARLEN_SDPA in seen and tiny_model.config._attn_implementation == "sdpa"


def test_rows_stay_short_for_attention_that_masks_the_whole_row(tiny_model) -> None:
    """Eager attention computes (W, W) scores: its packed rows are capped; varlen-capable ones are not."""
    assert packed_row_capacity(tiny_model) is None  # sdpa: switched to varlen for packed training
    tiny_model.set_attn_implementation("eager")
    assert packed_row_capacity(tiny_model) == MASKED_ROW_TOKENS
    long_samples = [make_example(list(range(3, 203)), list(range(3, 103))) for _ in range(4)]  # 300 tokens each
    objective = lora_objective(tiny_model)
    widths: list[int] = []
    hook = tiny_model.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    cfg = TrainerConfig(max_steps=1, batch_size=4, learning_rate=0.01, packing=True)
    fit(objective, long_samples, [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    hook.remove()
    assert widths and max(widths) <= MASKED_ROW_TOKENS


def _causal_spans_reference(query, key, value, lengths, scale=None, window=None):
    """Per-span causal SDPA in fp64 with repeated key/value heads: (1, H, W, D) inputs -> (1, W, H, D).

    With a window, query i sees keys i - window < j <= i (transformers' sliding-window mask).
    """
    group = query.shape[1] // key.shape[1]
    pieces = []
    for q, k, v in zip(*(torch.split(t.double(), lengths, dim=2) for t in (query, key, value)), strict=True):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None]
        visible = (j <= i) & (j > i - window) if window else j <= i
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale).transpose(1, 2))
    return torch.cat(pieces, dim=1)


def _output_and_gradients(attend, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = attend(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.double()] + [leaf.grad.double() for leaf in leaves]


@pytest.mark.parametrize(("scale", "window"), [(None, None), (0.3, None), (None, 4)])
def test_bf16_span_attention_is_as_accurate_as_torch_bf16_attention(scale, window) -> None:
    """Same maths as causal SDPA per span (grouped heads, any lengths), with bf16 rounding only.

    Tolerance: relative errors (norm of the difference over the norm of the fp64 result) of the
    output and of the query/key/value gradients stay below 1.5x those of PyTorch's own bf16 SDPA
    on the same bf16 inputs (both are about 4e-3 here), and below 1e-2.
    """
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 6, 2, 16, [5, 17, 1, 30, 9]
    width = sum(lengths)
    inputs = [(torch.randn(1, h, width, dim) * 1.5).to(torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(1, width, heads, dim)
    reference = _output_and_gradients(lambda q, k, v: _causal_spans_reference(q, k, v, lengths, scale, window),
                                      inputs, grad_out)
    ours = _output_and_gradients(
        lambda q, k, v: _BF16SpanAttention.apply(q, k, v, lengths, scale or dim**-0.5, window), inputs, grad_out)

    def torch_bf16(q, k, v):
        def visible(n: int) -> torch.Tensor:
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            return (j <= i) & (j > i - window) if window else j <= i

        pieces = [F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible(qs.shape[2]), scale=scale,
                                                 enable_gqa=True)
                  for qs, ks, vs in zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)), strict=True)]
        return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1)

    torch_errors = [(a - r).norm() / r.norm() for a, r in zip(_output_and_gradients(torch_bf16, inputs, grad_out),
                                                             reference, strict=True)]
    our_errors = [(a - r).norm() / r.norm() for a, r in zip(ours, reference, strict=True)]
    for ours_error, torch_error in zip(our_errors, torch_errors, strict=True):
        assert ours_error < min(1e-2, 1.5 * torch_error)
    assert ours[0].shape == (1, width, heads, dim)


def test_packed_attention_under_cpu_bf16_autocast_takes_the_span_function(tiny_model, examples) -> None:
    """Packed rows under CPU bf16 autocast skip SDPA (its bf16 backward is slow there); padded ones keep it."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    batch = collate_packed(examples, pad_id=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy)
        with packed_attention(tiny_model), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):  # padded rows: transformers' SDPA as it is
            hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"])
    assert calls and all(calls)
    assert hidden.isfinite().all()
    with torch.no_grad():
        exact = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"])
    assert ((hidden.float() - exact).norm() / exact.norm()).item() < 2e-2  # bf16 matmuls throughout the model


def test_packed_attention_keeps_fp32_sdpa_for_dropout_and_without_autocast(tiny_model, examples) -> None:
    """Attention dropout (not in the span function) and fp32 training run SDPA per span, in fp32."""
    dtypes = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        dtypes.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return original(query, key, value, *args, **kwargs)

    batch = collate_packed(examples, pad_id=0)
    spans = len(examples) * tiny_model.config.num_hidden_layers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy)
        with packed_attention(tiny_model):
            hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
            assert dtypes == [(torch.float32, False)] * spans
            dtypes.clear()
            tiny_model.train()
            for layer in tiny_model.model.layers:
                patch.setattr(layer.self_attn, "attention_dropout", 0.1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
            assert dtypes == [(torch.float32, False)] * spans


def _tiny_sliding_window_model(window: int) -> torch.nn.Module:
    """A 2-layer Mistral (Llama with a sliding window) the size of the tiny Llama."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=window, pad_token_id=0, tie_word_embeddings=False)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_rows_keep_the_sliding_window(examples, precision: str) -> None:
    """A model with a 4-token window sees the same keys packed as alone, in spans longer than the window.

    Tolerance: fp32 as above (1e-5); under bf16 autocast, a relative 2e-2 of the fp32 result
    (bf16 matmuls throughout the model), far below what attending past the window changes.
    """
    model = _tiny_sliding_window_model(window=4)
    batch = collate_packed(examples, pad_id=0)
    edges = batch["cu_seq_lens"].tolist()
    assert max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True)) > 4
    with torch.no_grad():
        alone = torch.cat([hidden_states(model, batch["input_ids"][:, a:b], None)
                           for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=1)
        with packed_attention(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            varlen = hidden_states(model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
        model.config.sliding_window = None
        unwindowed = torch.cat([hidden_states(model, batch["input_ids"][:, a:b], None)
                                for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=1)
    assert (unwindowed - alone).norm() / alone.norm() > 0.1  # the window matters for these spans
    if precision == "fp32":
        assert torch.allclose(varlen, alone, atol=1e-5)
    else:
        assert ((varlen.float() - alone).norm() / alone.norm()).item() < 2e-2


def test_packed_gradients_keep_the_sliding_window(examples) -> None:
    """LoRA gradients of packed rows equal padded rows' (transformers' own sliding-window mask)."""
    assert_packed_gradients_equal_padded(lora_objective(_tiny_sliding_window_model(window=4)), examples)


# --- CUDA: one call of torch's varlen flash attention per packed row -------------------------------
# The kernel itself runs only on CUDA (checked by the GPU check); here a reference with its documented
# contract, (T, heads, D) tokens, int32 boundaries, (left, right) windows, stands in for it, so these
# tests check everything tunewright passes to it and takes back.

def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract, in fp64 on any device."""
    assert query.dim() == 3 and cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    edges = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))
    if not enable_gqa:
        assert key.shape[1] == query.shape[1], "grouped heads without enable_gqa"
    left, right = window_size
    pieces = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        q, k, v = (t[a:b].transpose(0, 1).double() for t in (query, key, value))  # (heads, L, D)
        k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None]
        visible = ((j <= i + right) if right >= 0 else True) & ((j >= i - left) if left >= 0 else True)
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale).transpose(0, 1))
    return torch.cat(pieces).to(query.dtype)


def reference_varlen_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                                 window_size=(-1, -1)):
    """An older varlen_attn: no enable_gqa keyword."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            window_size=window_size)


@pytest.mark.parametrize("varlen", [reference_varlen, reference_varlen_without_gqa])
@pytest.mark.parametrize(("scale", "window"), [(None, None), (0.3, None), (None, 4)])
def test_varlen_kernel_call_matches_causal_spans(varlen, scale, window) -> None:
    from tunewright.kernels.attention import attend_with_varlen

    generator = torch.Generator().manual_seed(0)
    lengths = [7, 3, 11, 1]
    query = torch.randn(1, 4, sum(lengths), 8, generator=generator)
    key, value = (torch.randn(1, 2, sum(lengths), 8, generator=generator) for _ in range(2))
    bounds = torch.tensor([0, 7, 10, 21, 22], dtype=torch.int64)  # converted to int32 on the way
    attended = attend_with_varlen(varlen, query, key, value, bounds, max(lengths),
                                  scale or query.shape[-1] ** -0.5, window)
    expected = _causal_spans_reference(query, key, value, lengths, scale=scale, window=window)
    assert attended.shape == (1, sum(lengths), 4, 8)
    assert torch.allclose(attended.double(), expected, atol=1e-6)


@pytest.fixture
def varlen_kernel_on_any_device(monkeypatch):
    """Route packed rows to the reference kernel whatever the device and dtype; record each call."""
    from tunewright.kernels import attention

    calls: list[tuple[int, tuple[int, int]]] = []

    def recording_kernel(*args, **kwargs):
        calls.append((args[5], kwargs["window_size"]))
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(attention, "torch_varlen_attention", lambda: recording_kernel)
    monkeypatch.setattr(attention, "torch_varlen_applies", lambda *_: True)
    return calls


def test_packed_rows_through_the_varlen_kernel_equal_samples_alone(tiny_model, examples,
                                                                   varlen_kernel_on_any_device) -> None:
    batch = collate_packed(examples, pad_id=0)
    edges = batch["cu_seq_lens"].tolist()
    with torch.no_grad():
        alone = torch.cat([hidden_states(tiny_model, batch["input_ids"][:, a:b], None)
                           for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=1)
        with packed_attention(tiny_model):
            varlen = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
    longest = max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))
    assert varlen_kernel_on_any_device == [(longest, (-1, 0))] * tiny_model.config.num_hidden_layers
    assert torch.allclose(varlen, alone, atol=1e-5)


def test_packed_gradients_through_the_varlen_kernel_keep_the_window(examples, varlen_kernel_on_any_device) -> None:
    """The kernel's backward (here autograd through the reference) gives the padded rows' LoRA gradients,
    and a window of 4 keys reaches the kernel as (3, 0)."""
    assert_packed_gradients_equal_padded(lora_objective(_tiny_sliding_window_model(window=4)), examples)
    assert {window for _, window in varlen_kernel_on_any_device} == {(3, 0)}


class _FakeTensor:
    """What torch_varlen_applies reads of a tensor: a device type, a dtype and a shape."""

    def __init__(self, device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.device, self.dtype, self.shape = torch.device(device), dtype, shape


@pytest.mark.parametrize(("device", "dtype", "head_dim", "kwargs", "applies"), [
    ("cuda", torch.bfloat16, 64, {}, True),
    ("cuda", torch.float16, 64, {"dropout": 0.0, "scaling": 0.125}, True),
    ("cuda", torch.float32, 64, {}, False),  # flash attention has no fp32: per-span SDPA
    ("cpu", torch.bfloat16, 64, {}, False),  # CPU keeps its span attention
    ("cuda", torch.bfloat16, 64, {"dropout": 0.1}, False),
    ("cuda", torch.bfloat16, 64, {"softcap": 30.0}, False),
    ("cuda", torch.bfloat16, 512, {}, False),  # head size beyond flash attention's
])
def test_varlen_kernel_only_where_flash_attention_runs(device, dtype, head_dim, kwargs, applies, monkeypatch) -> None:
    from tunewright.kernels import attention

    monkeypatch.setattr(attention, "torch_varlen_attention", lambda: reference_varlen)
    query = _FakeTensor(device, dtype, (1, 9, 100, head_dim))
    key = _FakeTensor(device, dtype, (1, 3, 100, head_dim))
    assert attention.torch_varlen_applies(torch.nn.Module(), query, key, kwargs) is applies


def test_varlen_kernel_is_found_in_this_torch() -> None:
    """torch 2.13 (the lock's) has varlen_attn with the keywords used, so a GPU run takes it."""
    from tunewright.kernels.attention import torch_varlen_attention

    assert torch_varlen_attention() is not None


def test_a_failing_varlen_kernel_falls_back_to_spans_once(tiny_model, examples, monkeypatch, caplog) -> None:
    """A kernel that raises (a GPU its flash kernels do not support) costs one warning, never the run."""
    from tunewright.kernels import attention, forwards

    calls = []

    def unsupported_kernel(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore detail")

    monkeypatch.setattr(attention, "torch_varlen_attention", lambda: unsupported_kernel)
    monkeypatch.setattr(attention, "torch_varlen_applies", lambda *_: True)
    monkeypatch.setattr(forwards, "_warned", set())
    batch = collate_packed(examples, pad_id=0)
    with torch.no_grad(), packed_attention(tiny_model):
        first = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
        again = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"])
    masked = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"])
    assert len(calls) == 1 and torch.equal(first, again)
    assert torch.allclose(first, masked, atol=1e-5)
    assert "Ampere" in caplog.text and "more detail" not in caplog.text
