"""Preference losses against TRL 1.16, the anchor: same pairs, same tiny Llama, same LoRA weights, fp32 on CPU.

Each test tokenizes the pairs with TRL's own trainer and with tunewright, checks that the token
ids agree, then compares the first-step loss and every LoRA gradient. Tolerance: 1e-5 relative
(rtol) and 1e-6 absolute (atol) in fp32; the two sides sum the same numbers in a different order.

The LoRA B matrices are random (peft `init_lora_weights=False`), so the policy differs from the
reference and every gradient is non-zero: with peft's zero B the first DPO step is log 2 exactly.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import build_model, build_tokenizer  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from tunewright.config import validate_config  # noqa: E402
from tunewright.preference_data import DataCounts, build_preference_examples  # noqa: E402
from tunewright.preference_objective import PreferenceObjective, Reference, collate_pairs  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
WORDS = ["cat", "dog", "sun", "sea"]


LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                  init_lora_weights=False)


def peft_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our LoRA model (random B) and an identical base model for TRL, which adds the adapter itself
    (given a peft model, TRL takes its adapter as the reference: a continued adapter)."""
    tokenizer = build_tokenizer()
    base = build_model(len(tokenizer))
    theirs = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LORA)
    model.train()
    return model, theirs


def same_lora_weights(trainer: object, ours: torch.nn.Module) -> None:
    """Copy our adapter's weights into the one TRL built, so both start from the same point."""
    lora = {name: tensor for name, tensor in ours.state_dict().items() if "lora_" in name}
    result = trainer.model.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys and lora


def tunewright_config(trainer: str, **preference: object):
    return validate_config({
        "input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
        "adapter": {"type": "lora", "r": 4, "alpha": 8}, "trainer": {"type": trainer},
        "preference": preference,
    })


def lora_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def assert_same_gradients(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours_grads, their_grads = lora_gradients(ours), lora_gradients(theirs)
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for name, gradient in ours_grads.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradient, their_grads[name], rtol=RTOL, atol=ATOL, msg=name)


def trl_args(config_class: type, folder: Path, **options: object):
    return config_class(output_dir=str(folder), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                        bf16=False, fp16=False, **options)


def our_step(model: torch.nn.Module, frame: pd.DataFrame, trainer: str, shared: bool = True, **preference: object
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Our first-step loss (and gradients in `model`), with the prompt read once per pair (`shared`, the
    default for dpo/orpo/simpo) or twice; returns the loss and the batch as separate rows."""
    config = tunewright_config(trainer, **preference)
    tokenizer = build_tokenizer()
    examples = build_preference_examples(frame, config, tokenizer, DataCounts(rows=len(frame)), "test").examples
    objective = PreferenceObjective(model, trainer, config.preference, Reference())
    out = objective(**collate_pairs(examples, tokenizer.pad_token_id, kto=trainer == "kto", shared=shared))
    loss = out.loss_sum / len(examples)
    loss.backward()
    return loss.detach(), collate_pairs(examples, tokenizer.pad_token_id, kto=trainer == "kto", shared=False)


def pairs_frame(prompt: str = "say {}:") -> pd.DataFrame:
    return pd.DataFrame({"prompt": [prompt.format(w) for w in WORDS], "chosen": [f" {w}" for w in WORDS],
                         "rejected": [f" {w[::-1]}!" for w in WORDS]})


def trl_first_loss(trainer, ours):  # noqa: ANN001, ANN201
    """TRL's loss on the whole dataset as one batch, with our LoRA weights copied into its adapter first."""
    same_lora_weights(trainer, ours)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    return trainer.compute_loss(trainer.model, batch), batch


@pytest.mark.parametrize("shared", [True, False], ids=["prompt-once", "separate-rows"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_first_step_matches_trl(tmp_path: Path, loss_type: str, shared: bool) -> None:
    ours, theirs = peft_pair()
    frame = pairs_frame()
    beta = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=theirs, args=trl_args(trl.DPOConfig, tmp_path, beta=beta, loss_type=loss_type,
                                                             max_length=None),
                                 train_dataset=datasets.Dataset.from_pandas(frame), processing_class=build_tokenizer(),
                                 peft_config=LORA)
        their_loss, their_batch = trl_first_loss(trainer, ours)
    their_loss.backward()
    loss, batch = our_step(ours, frame, "dpo", shared, beta=beta, loss_type=loss_type)
    assert batch["input_ids"].tolist() == their_batch["input_ids"].tolist()
    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=ATOL)
    assert abs(loss.item() - 0.6931) > 1e-3  # the policy is not the reference: a real comparison
    assert_same_gradients(ours, trainer.model)


def test_orpo_first_step_matches_trl(tmp_path: Path) -> None:
    """TRL's ORPO NLL also covers prompt tokens, ours the response only (as the paper's L_SFT): with a
    one-token prompt (BOS, which nothing predicts) the two coincide."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself with a warning
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ours, theirs = peft_pair()
    frame = pairs_frame("<|im_start|>")
    weight = 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=theirs, args=trl_args(ORPOConfig, tmp_path, beta=weight, max_length=64),
                              train_dataset=datasets.Dataset.from_pandas(frame), processing_class=build_tokenizer(),
                              peft_config=LORA)
        their_loss, their_batch = trl_first_loss(trainer, ours)
    their_loss.backward()
    loss, batch = our_step(ours, frame, "orpo", orpo_lambda=weight)
    chosen_rows = batch["input_ids"][: len(frame)]
    assert [row[row != 0].tolist() for row in chosen_rows] == \
        [row[row != 0].tolist() for row in their_batch["chosen_input_ids"]]
    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_same_gradients(ours, trainer.model)


def test_kto_first_step_matches_trl(tmp_path: Path) -> None:
    ours, theirs = peft_pair()
    frame = pd.DataFrame({"prompt": [f"say {w}:" for w in WORDS], "chosen": [f" {w}" for w in WORDS],
                          "label": [True, False, True, False]})
    beta = 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_frame = frame.rename(columns={"chosen": "completion"})
        trainer = trl.KTOTrainer(model=theirs, args=trl_args(trl.KTOConfig, tmp_path, beta=beta, max_length=None,
                                                             desirable_weight=1.0, undesirable_weight=1.5),
                                 train_dataset=datasets.Dataset.from_pandas(their_frame),
                                 processing_class=build_tokenizer(), peft_config=LORA)
        their_loss, their_batch = trl_first_loss(trainer, ours)
    their_loss.backward()
    loss, batch = our_step(ours, frame, "kto", beta=beta, kto_undesirable_weight=1.5)
    assert batch["input_ids"][: len(frame)].tolist() == their_batch["input_ids"].tolist()
    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_same_gradients(ours, trainer.model)
