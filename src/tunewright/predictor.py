"""TunedModel: a loaded model + tokenizer + resolved config, with batched predict/generate."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunewright.chat_data import chat_prompt_ids, frame_conversations, history_of
from tunewright.config import GenerationSettings, TunewrightConfig
from tunewright.data import Dataset, as_frame, check_columns, encode_prompts, fit_prompts, render_prompts
from tunewright.errors import ConfigError
from tunewright.few_shot import FewShotIndex
from tunewright.generate import generate_texts
from tunewright.heads import (
    CONTENT_FREE_INPUTS,
    ROWS_NEED_TRAINING,
    ClassifierObjective,
    calibrate,
    classifier_log_probs,
    encode_labels,
    label_start_tokens,
    load_head,
    load_label_prior,
    mean_prior,
    score_labels,
)
from tunewright.kernels.prepacked import inference_kernels
from tunewright.model import base_model, max_input_length
from tunewright.progress import log_phase, work_progress

log = logging.getLogger(__name__)

PREDICTION_COLUMN = "prediction"
PROBABILITY_COLUMN = "prediction_probability"
LABEL_PROBABILITY_PREFIX = "probability_"


@dataclass
class TunedModel:
    """What `tunewright.load` returns: everything needed to predict, evaluate, serve or export.

    Category outputs also carry their label vocabulary, and for the classifier decoder the
    objective that holds the trained head (it shares `model`).
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: TunewrightConfig
    labels: list[str] | None = None
    classifier: ClassifierObjective | None = None
    few_shot: FewShotIndex | None = None  # prompt.few_shot: the training split's solved examples
    # calibration: rows: training inputs the prior is estimated from (while training), and the prior itself.
    calibration_inputs: pd.DataFrame | None = None
    label_prior: torch.Tensor | None = None

    @property
    def predict_batch_size(self) -> int:
        """Rows per model batch when predicting: label scoring's evaluation batch, or generation's."""
        if self.is_category:
            return self.config.trainer.eval_batch_size or self.config.trainer.batch_size
        return self.config.generation.batch_size

    @property
    def max_input_len(self) -> int:
        base = base_model(self.model)
        cap = self.config.preprocessing.max_input_length
        return max_input_length(base, self.config.generation.max_new_tokens, cap)

    @property
    def max_sequence_len(self) -> int:
        """Longest training sequence of conversation data: the model's context (or preprocessing.max_input_length)."""
        return max_input_length(base_model(self.model), 0, self.config.preprocessing.max_input_length)

    @property
    def is_category(self) -> bool:
        return self.config.output_feature.type == "category"

    def encode_texts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Rendered prompts -> token ids, truncated (never dropped) to the maximum input length."""
        ids = encode_prompts(prompts, self.tokenizer, self.config.prompt.use_chat_template)
        kept, _ = fit_prompts(ids, self.max_input_len, "truncate")
        return kept

    def encode_frame(self, frame: pd.DataFrame, in_pool: bool = False) -> list[list[int]]:
        """Rows -> prompt token ids; `in_pool`: the rows are training rows (none is its own few-shot example)."""
        if self.config.conversation is not None:
            return self.encode_conversations(frame_conversations(frame, self.config.conversation,
                                                                 require_assistant_last=False))
        return self.encode_texts(self.render_frame(frame, in_pool))

    def render_frame(self, frame: pd.DataFrame, in_pool: bool = False) -> list[str]:
        """Each row's prompt text, with its few-shot examples when the config asks for them."""
        if self.config.prompt.few_shot is not None and self.few_shot is None:
            raise ConfigError("prompt.few_shot: this model has no pool of training examples; train a run "
                              "(trainer.type none keeps the training split as the pool), or pass few_shot_pool "
                              "to from_config")
        return render_prompts(frame, self.config, self.few_shot, in_pool)

    def encode_conversations(self, conversations: Sequence[list[dict[str, Any]]]) -> list[list[int]]:
        """Each conversation's history (a final assistant turn is the answer: left out) through the run's
        chat template, ready for the assistant's reply; truncated from the left to the maximum input length."""
        histories = [history_of(messages, self.config.prompt.reasoning) for messages in conversations]
        kept, _ = fit_prompts(chat_prompt_ids(self.tokenizer, histories), self.max_input_len, "truncate")
        return kept

    def generate(self, prompts: Sequence[str], settings: GenerationSettings | None = None,
                 show_progress: bool = False) -> list[str]:
        """Complete already-rendered prompt texts."""
        settings = settings or self.config.generation
        return generate_texts(self.model, self.tokenizer, self.encode_texts(prompts), settings, show_progress)

    def label_log_probs(self, prompt_ids: Sequence[list[int]], show_progress: bool = False) -> torch.Tensor:
        """(N, L) log-probabilities of each label (contextually calibrated when the output feature asks)."""
        started = time.perf_counter()
        log_probs = self.uncalibrated_label_log_probs(prompt_ids, show_progress)
        calibration = self.config.output_feature.calibration
        if self.classifier is None and calibration in ("content_free", "rows"):
            prior = self.content_free_log_prior() if calibration == "content_free" else self.rows_log_prior()
            log_probs = calibrate(log_probs, prior)
        log_phase(f"scored {log_probs.shape[1]} labels for {log_probs.shape[0]:,} rows", started)
        return log_probs

    def content_free_log_prior(self) -> torch.Tensor:
        """(L,) the prompt's own leaning: mean label probabilities when every input is content-free."""
        frame = pd.DataFrame({column: list(CONTENT_FREE_INPUTS) for column in self.config.input_columns})
        return mean_prior(self.uncalibrated_label_log_probs(self.encode_frame(frame)))

    def rows_log_prior(self) -> torch.Tensor:
        """(L,) the prompt's leaning over the training inputs (calibration: rows): saved with a run, else
        estimated with the weights of the moment from `calibration_inputs` and kept until they change."""
        if self.label_prior is None:
            if self.calibration_inputs is None:
                raise ConfigError(ROWS_NEED_TRAINING)
            ids = self.encode_frame(self.calibration_inputs, in_pool=True)
            self.label_prior = mean_prior(self.uncalibrated_label_log_probs(ids))
        return self.label_prior

    def uncalibrated_label_log_probs(self, prompt_ids: Sequence[list[int]],
                                     show_progress: bool = False) -> torch.Tensor:
        """(N, L) log-probabilities of each label, in batches sorted by length (results keep input order)."""
        if self.labels is None:
            raise ValueError("label_log_probs needs a category model with a label vocabulary")
        feature = self.config.output_feature
        pad_id = self.tokenizer.pad_token_id
        batch_size = self.predict_batch_size
        label_ids = encode_labels(self.tokenizer, self.labels) if feature.decoder == "label_scoring" else []
        order = sorted(range(len(prompt_ids)), key=lambda row: len(prompt_ids[row]), reverse=True)
        result = torch.zeros(len(prompt_ids), len(self.labels))
        # As in generation: inference on CPU multiplies through weights packed once (kernels/prepacked.py).
        with inference_kernels(self.model), work_progress(len(prompt_ids), "scoring labels", show_progress) as progress:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = [prompt_ids[row] for row in rows]
                if self.classifier is not None:
                    result[rows] = classifier_log_probs(self.classifier, batch, pad_id)
                else:
                    scores = score_labels(self.model, batch, label_ids, pad_id, feature.score_normalization)
                    result[rows] = scores.log_softmax(dim=-1)
                progress.update(advance=len(rows))
        return result

    def predict_labels(self, frame: pd.DataFrame, show_progress: bool = False,
                       all_probabilities: bool = False) -> tuple[pd.DataFrame, torch.Tensor]:
        """The rows with `prediction` (label) and `prediction_probability`, and the (N, L) log-probs."""
        assert self.labels is not None
        log_probs = self.label_log_probs(self.encode_frame(frame), show_progress)
        probabilities = log_probs.exp()
        best = probabilities.argmax(dim=-1)
        result = frame.copy()
        result[PREDICTION_COLUMN] = [self.labels[index] for index in best.tolist()]
        result[PROBABILITY_COLUMN] = probabilities.max(dim=-1).values.tolist()
        if all_probabilities:
            for position, label in enumerate(self.labels):
                result[f"{LABEL_PROBABILITY_PREFIX}{label}"] = probabilities[:, position].tolist()
        return result, log_probs

    def predict(self, frame: pd.DataFrame, show_progress: bool = False,
                all_probabilities: bool = False) -> pd.DataFrame:
        """The input rows with a `prediction` column added (and, for categories, its probability).

        Args:
            frame: rows holding the input columns.
            show_progress: show a progress bar.
            all_probabilities: categories only: add a `probability_<label>` column per label.
        """
        if self.is_category:
            return self.predict_labels(frame, show_progress, all_probabilities)[0]
        ids = self.encode_frame(frame)
        texts = generate_texts(self.model, self.tokenizer, ids, self.config.generation, show_progress)
        result = frame.copy()
        result[PREDICTION_COLUMN] = texts
        return result


def attach_category(tuned: TunedModel, vocabulary: Sequence[str], run_dir: Path | None = None) -> TunedModel:
    """Give a category model its label vocabulary and, for the classifier decoder, its head.

    The head is loaded from `run_dir` when given; otherwise it is new, reading each label's first
    token(s) from the averaged probabilities (see ClassifierObjective).
    """
    tuned.labels = list(vocabulary)
    if tuned.config.output_feature.decoder == "classifier":
        starts = label_start_tokens(tuned.tokenizer, vocabulary)
        tuned.classifier = ClassifierObjective(tuned.model, len(vocabulary), starts)
        if run_dir is not None:
            load_head(run_dir, tuned.classifier)
        elif tuned.config.trainer.type == "none":
            log.warning("decoder classifier with trainer.type none: the head is untrained (it only reads the "
                        "labels' first tokens); decoder label_scoring is the zero-shot method")
    elif tuned.config.output_feature.calibration == "rows" and run_dir is not None:
        tuned.label_prior = load_label_prior(run_dir, len(vocabulary))  # estimated when the run was trained
    return tuned


def predict_rows(tuned: TunedModel, dataset: Dataset, show_progress: bool = False,
                 all_probabilities: bool = False) -> pd.DataFrame:
    """`tuned.predict` on a file, DataFrame or list of rows, after checking its input columns."""
    frame, source = as_frame(dataset)
    check_columns(frame, tuned.config.input_columns, source)
    return tuned.predict(frame, show_progress, all_probabilities)
