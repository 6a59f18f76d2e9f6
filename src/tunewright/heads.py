"""Category outputs: the label vocabulary, the classifier-head objective and batched label scoring.

Two ways to decide a label (`output_features[0].decoder`):

- `classifier` (the reference design's way): the LM's next-token probabilities are averaged over
  the prompt's positions and fed to a trainable linear head (vocab -> labels), trained with
  cross-entropy jointly with the adapter.
- `label_scoring`: each label's tokens are scored as the continuation of the prompt; a softmax
  over the label scores gives the label probabilities. Works zero-shot; fine-tuning for it is plain
  LM fine-tuning on the gold label text.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tunewright.adapters import uses_virtual_tokens
from tunewright.config import OutputFeature
from tunewright.data import IGNORE_INDEX, Example, collate_prompts
from tunewright.errors import DataError, RunFolderError
from tunewright.generate import packed_prefill, packed_prefill_applies, prompt_positions
from tunewright.objective import LossOutput, causal_lm_parts, hidden_states

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
PRIOR_FILE = "label_prior.json"


# --- label vocabulary ------------------------------------------------------------------------------


def label_texts(values: pd.Series | Sequence[object], column: str, source: str) -> list[str]:
    """Cell values as label strings (stripped); an empty label is an error naming its row."""
    labels = [str(value).strip() for value in values]
    empty = [row for row, label in enumerate(labels) if not label]
    if empty:
        raise DataError(
            f"{source}: column '{column}' has {len(empty)} empty label(s) (first: row {empty[0]}); "
            "fill them in or remove those rows"
        )
    return labels


def label_vocabulary(feature: OutputFeature, train_labels: Sequence[str], source: str) -> list[str]:
    """The label set: `output_features[0].labels` when given, else the sorted distinct training labels.

    Raises:
        DataError: the training labels hold a single class, or labels missing from the configured set.
    """
    distinct = sorted(set(train_labels))
    if feature.labels is not None:
        unknown = [label for label in distinct if label not in feature.labels]
        if unknown:
            raise DataError(
                f"{source}: column '{feature.name}' has label(s) {', '.join(map(repr, unknown[:5]))} "
                f"that are not in output_features[0].labels ({', '.join(feature.labels)}); "
                "add them or fix the data"
            )
        return list(feature.labels)
    if len(distinct) < 2:
        only = repr(distinct[0]) if distinct else "none"
        raise DataError(
            f"{source}: column '{feature.name}' has a single class ({only}); a category needs at least two "
            "labels in the training data, or list them in output_features[0].labels"
        )
    return distinct


def label_indices(labels: Sequence[str], vocabulary: Sequence[str]) -> list[int]:
    index = {label: position for position, label in enumerate(vocabulary)}
    return [index[label] for label in labels]


# --- classifier head -------------------------------------------------------------------------------


class ClassifierObjective(nn.Module):
    """Averaged next-token probabilities -> linear head -> label logits, with cross-entropy.

    The head is a submodule, so Accelerate/DDP wrap and synchronise it with the adapter. Given
    `label_token_ids`, it starts as a reader of each label's own tokens (weight 1 from each label's
    first token(s), 0 elsewhere), so the untrained head is already a weak zero-shot classifier and
    the adapter gets a useful gradient from the first step; without them it starts at zero
    (uniform label probabilities).
    """

    def __init__(
        self, model: nn.Module, num_labels: int, label_token_ids: Sequence[Sequence[int]] | None = None
    ):
        super().__init__()
        self.model = model
        _, lm_head = causal_lm_parts(model)
        vocab_size = lm_head.weight.shape[0]
        self.head = nn.Linear(vocab_size, num_labels, device=lm_head.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            for label, token_ids in enumerate(label_token_ids or []):
                self.head.weight[label, list(token_ids)] = 1.0
        # The averaged probabilities sum to 1, so their entries are tiny; scaling by sqrt(V) gives the
        # uniform distribution unit L2 norm, so AdamW at the adapter's learning rate moves the head's
        # logits at a useful pace (on unscaled probabilities a step moves a logit by at most lr).
        self.input_scale = float(vocab_size) ** 0.5

    def label_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) prompts, right- or left-padded -> (B, L) label logits."""
        real = attention_mask.bool()  # (B, T): padding does not count
        if uses_virtual_tokens(self.model):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[
                :, -input_ids.shape[1] :
            ][real]
        else:
            # The LM head and softmax only at real positions: (N, V) instead of (B, T, V).
            _, lm_head = causal_lm_parts(self.model)
            logits = lm_head(hidden_states(self.model, input_ids, attention_mask)[real])  # (N, V)
        probabilities = logits.float().softmax(dim=-1)  # (N, V)
        owners = torch.arange(len(real), device=real.device)[:, None].expand_as(real)[real]  # (N,): row of each
        sums = probabilities.new_zeros(len(real), probabilities.shape[-1]).index_add_(0, owners, probabilities)
        mean = sums / real.sum(dim=1, keepdim=True).clamp(min=1)  # (B, V)
        return self.head(mean * self.input_scale)  # (B, L)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        label_index: torch.Tensor,
        **_: torch.Tensor,
    ) -> LossOutput:
        logits = self.label_logits(input_ids, attention_mask)  # (B, L)
        loss_sum = F.cross_entropy(logits, label_index, reduction="sum")
        correct = (logits.argmax(dim=-1) == label_index).sum()
        # count on the batch's device: evaluate_loss stacks it with the loss (a CPU count breaks that on CUDA)
        return LossOutput(loss_sum=loss_sum, count=label_index.new_tensor(len(label_index)), correct=correct)


def classifier_examples(prompt_ids: Sequence[list[int]], indices: Sequence[int]) -> list[Example]:
    """Prompt-only examples for the classifier (the label must not be in its input).

    Each example unmasks exactly one label position (the last prompt token): the training loop
    normalises the loss by unmasked positions, which then equals the number of samples, matching
    the per-sample sum that ClassifierObjective returns.
    """
    examples = []
    for ids, index in zip(prompt_ids, indices, strict=True):
        labels = [IGNORE_INDEX] * (len(ids) - 1) + [ids[-1]]
        examples.append(Example(input_ids=list(ids), labels=labels, prompt_len=len(ids), label_index=index))
    return examples


def right_pad(prompt_ids: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the right (positions then start at 0 in every row)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def classifier_log_probs(
    objective: ClassifierObjective, prompt_ids: Sequence[list[int]], pad_id: int
) -> torch.Tensor:
    """(B, L) label log-probabilities of the classifier for one batch of prompts."""
    device = objective.head.weight.device
    input_ids, attention_mask = right_pad(prompt_ids, pad_id)
    logits = objective.label_logits(input_ids.to(device), attention_mask.to(device))
    return logits.float().log_softmax(dim=-1).cpu()


# --- label scoring ---------------------------------------------------------------------------------


def continuation_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits (N, V) at the (row, position) pairs in `positions` (N, 2), from one forward pass."""
    if uses_virtual_tokens(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1] :]
        return logits[positions[:, 0], positions[:, 1]]
    hidden = hidden_states(model, input_ids, attention_mask)  # (R, T, H)
    _, lm_head = causal_lm_parts(model)
    return lm_head(hidden[positions[:, 0], positions[:, 1]])  # only the scored positions reach the LM head


@torch.no_grad()
def score_labels(
    model: nn.Module,
    prompt_ids: Sequence[list[int]],
    label_ids: Sequence[list[int]],
    pad_id: int,
    normalization: str = "mean",
) -> torch.Tensor:
    """Log-likelihood (B, L) of every label's tokens as the continuation of every prompt.

    The prompts run once, left-padded, and their KV cache is reused for all labels: the first
    token of every label is scored from the prompt's last position, and the rest of the labels
    (when any label has more than one token) go through the model as one B x L batch of
    continuations. So a batch costs one pass over its prompts, however many labels there are,
    and the LM head runs only at the positions that predict label tokens.

    Args:
        model: a causal LM (optionally peft-wrapped).
        prompt_ids: B prompts as token ids (each non-empty).
        label_ids: L labels as token ids (each non-empty, no special tokens).
        pad_id: padding token id.
        normalization: `sum` of the label's token log-probs, or their `mean` (length-normalised).
    """
    if uses_virtual_tokens(model):  # prompt learning prepends tokens inside peft's forward: no shared cache
        scores = score_labels_flat(model, prompt_ids, label_ids, pad_id)
    else:
        scores = _score_with_cache(model, prompt_ids, label_ids, pad_id)
    if normalization == "mean":
        scores = scores / torch.tensor([len(label) for label in label_ids], dtype=scores.dtype)
    return scores


def cache_argument(decoder: nn.Module) -> str:
    """The decoder's KV-cache keyword: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _score_with_cache(
    model: nn.Module, prompt_ids: Sequence[list[int]], label_ids: Sequence[list[int]], pad_id: int
) -> torch.Tensor:
    """Summed label log-likelihoods (B, L): prompts once, then the label continuations on their cache."""
    decoder, lm_head = causal_lm_parts(model)
    device = lm_head.weight.device
    batch = collate_prompts(prompt_ids, pad_id)
    prompt_input_ids = batch["input_ids"].to(device)
    prompt_mask = batch["attention_mask"].to(device)  # (B, P), left-padded
    prompt_lens = prompt_mask.sum(dim=-1)  # (B,)
    cache_key = cache_argument(decoder)
    if packed_prefill_applies(model, prompt_mask):  # the same logits and cache without the padding work
        first_logits, cache = packed_prefill(model, prompt_input_ids, prompt_mask)
    else:
        output = decoder(
            input_ids=prompt_input_ids,
            attention_mask=prompt_mask,
            position_ids=prompt_positions(prompt_mask),
            use_cache=True,
        )
        first_logits, cache = lm_head(output.last_hidden_state[:, -1]), getattr(output, cache_key)
    first_log_probs = first_logits.float().log_softmax(dim=-1)  # (B, V)
    scores = first_log_probs[:, [label[0] for label in label_ids]]  # (B, L)
    width = max(len(label) for label in label_ids) - 1
    if width == 0:
        return scores.cpu()
    num_prompts, num_labels = len(prompt_ids), len(label_ids)
    # Continuation row b*L + l feeds label l's tokens but the last, to predict its tokens after the first.
    inputs = torch.full((num_labels, width), pad_id, dtype=torch.long)  # (L, W)
    targets = torch.full((num_labels, width), IGNORE_INDEX, dtype=torch.long)  # (L, W)
    for row, label in enumerate(label_ids):
        inputs[row, : len(label) - 1] = torch.tensor(label[:-1])
        targets[row, : len(label) - 1] = torch.tensor(label[1:])
    inputs, targets = inputs.repeat(num_prompts, 1).to(device), targets.repeat(num_prompts, 1).to(device)
    continuation_mask = (targets != IGNORE_INDEX).long()  # (B*L, W), right-padded
    cache.batch_repeat_interleave(num_labels)  # cache row b -> rows b*L .. b*L + L-1
    positions = prompt_lens.repeat_interleave(num_labels)[:, None] + torch.arange(
        width, device=device
    )  # (B*L, W)
    mask = torch.cat([prompt_mask.repeat_interleave(num_labels, dim=0), continuation_mask], dim=1)
    hidden = decoder(
        input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_key: cache}
    ).last_hidden_state  # (B*L, W, H)
    scored = targets != IGNORE_INDEX
    token_log_probs = lm_head(hidden[scored]).float().log_softmax(dim=-1).gather(1, targets[scored][:, None])
    owners = torch.arange(num_prompts * num_labels, device=device)[:, None].expand(-1, width)[scored]
    rest = torch.zeros(num_prompts * num_labels, device=device).index_add_(0, owners, token_log_probs[:, 0])
    return (scores + rest.view(num_prompts, num_labels)).cpu()


def score_labels_flat(
    model: nn.Module, prompt_ids: Sequence[list[int]], label_ids: Sequence[list[int]], pad_id: int
) -> torch.Tensor:
    """Summed label log-likelihoods (B, L) from one right-padded batch of all B x L prompt+label rows.

    Recomputes each prompt once per label; used where the prompt's cache cannot be shared.
    """
    rows = [[*prompt, *label] for prompt in prompt_ids for label in label_ids]  # B*L rows, label fastest
    input_ids, attention_mask = right_pad(rows, pad_id)
    device = next(model.parameters()).device
    positions, targets, owners = [], [], []
    for row, (prompt, label) in enumerate((p, lab) for p in prompt_ids for lab in label_ids):
        for offset, token in enumerate(label):
            positions.append((row, len(prompt) + offset - 1))  # position t predicts token t + 1
            targets.append(token)
            owners.append(row)
    logits = continuation_logits(
        model, input_ids.to(device), attention_mask.to(device), torch.tensor(positions, device=device)
    )  # (N, V)
    token_log_probs = (
        logits.float().log_softmax(dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])
    )
    owner = torch.tensor(owners, device=device)
    scores = torch.zeros(len(rows), device=device).index_add_(0, owner, token_log_probs[:, 0])  # (B*L,)
    return scores.view(len(prompt_ids), len(label_ids)).cpu()


def label_start_tokens(tokenizer: object, vocabulary: Sequence[str]) -> list[list[int]]:
    """Each label's first token, written as it starts a reply ("positive") and after a space (" positive")."""
    starts = []
    for label in vocabulary:
        variants = tokenizer([label, f" {label}"], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        starts.append(sorted({ids[0] for ids in variants if ids}))
    return starts


def encode_labels(tokenizer: object, vocabulary: Sequence[str]) -> list[list[int]]:
    """Token ids of each label as the target is tokenized for training (no special tokens)."""
    ids: list[list[int]] = tokenizer(list(vocabulary), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    empty = [label for label, label_ids in zip(vocabulary, ids, strict=True) if not label_ids]
    if empty:
        raise DataError(f"label {empty[0]!r} encodes to no tokens; use a label with visible text")
    return ids


# --- run folder --------------------------------------------------------------------------------------


def save_category_state(run_dir: Path, vocabulary: Sequence[str], head: nn.Module | None) -> None:
    """Write `labels.json` (and `head.safetensors` for the classifier) into the run folder."""
    (run_dir / LABELS_FILE).write_text(
        json.dumps(list(vocabulary), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    if head is not None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
        save_file(state, str(run_dir / HEAD_FILE))


def save_label_prior(run_dir: Path, log_prior: torch.Tensor) -> None:
    """Write `label_prior.json`: the (L,) log prior that calibration: rows divides by."""
    (run_dir / PRIOR_FILE).write_text(json.dumps({"log_prior": log_prior.tolist()}, indent=1), encoding="utf-8")


def load_label_prior(run_dir: Path, labels: int) -> torch.Tensor:
    path = run_dir / PRIOR_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: run folder without {PRIOR_FILE} (calibration: rows); retrain to write it")
    try:
        prior = torch.tensor(json.loads(path.read_text(encoding="utf-8"))["log_prior"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError):
        raise RunFolderError(f"{path}: not a label prior written by tunewright; retrain to rewrite it") from None
    if prior.shape != (labels,):
        raise RunFolderError(f"{path}: holds {prior.numel()} label priors for {labels} labels; retrain to rewrite it")
    return prior


def load_vocabulary(run_dir: Path) -> list[str]:
    path = run_dir / LABELS_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: category run folder without {LABELS_FILE}; retrain to write it")
    vocabulary: list[str] = json.loads(path.read_text(encoding="utf-8"))
    return vocabulary


def load_head(run_dir: Path, objective: ClassifierObjective) -> None:
    """Load `head.safetensors` into the objective's head (shapes are checked by load_state_dict)."""
    path = run_dir / HEAD_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: classifier run folder without {HEAD_FILE}; retrain to write it")
    try:
        objective.head.load_state_dict(load_file(str(path), device=str(objective.head.weight.device)))
    except RuntimeError as error:
        raise RunFolderError(
            f"{path}: does not fit this model and label set ({str(error).splitlines()[0]})"
        ) from None


# --- contextual calibration (Zhao et al. 2021, "Calibrate Before Use") ---------------------------------

# Inputs that say nothing about any label: what the prompt alone makes the model lean toward.
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
# calibration: rows without training rows to estimate its prior from (from_config, serve --config).
ROWS_NEED_TRAINING = ("output_features[0].calibration: rows estimates the labels' prior from training rows; train "
                      "the config (trainer.type none for zero-shot) and use the run, or use content_free")


def mean_prior(log_probs: torch.Tensor) -> torch.Tensor:
    """(L,) log of the mean label distribution over K rows' (K, L) log-probabilities: the content-free
    inputs, or (calibration: rows) a sample of the training split's inputs."""
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


def calibrate(log_probs: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """(N, L) log-probabilities divided by the prior (W = diag(prior)^-1, b = 0) and renormalised per row."""
    return (log_probs - log_prior).log_softmax(dim=-1)
