"""Config sections for the data: input and output features, the prompt, conversations, preprocessing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunewright.chat_templates import NAMED_TEMPLATES, is_template_path
from tunewright.config_section import Section


class InputFeature(Section):
    name: str = Field(description="Dataset column that feeds the prompt.")
    type: Literal["text"] = Field("text", description="Input features are text rendered into the prompt.")


class OutputFeature(Section):
    name: str = Field(description="Dataset column holding the target text or label.")
    type: Literal["text", "category"] = Field("text", description="`text` is generated; `category` is a label.")
    decoder: Literal["label_scoring", "classifier"] = Field(
        "label_scoring",
        description="Category only: score each label's tokens as the continuation (`label_scoring`), "
        "or average token probabilities into a trainable linear head (`classifier`).",
    )
    labels: list[str] | None = Field(
        None, description="Category only: the label set; by default the labels found in the training data."
    )
    score_normalization: Literal["sum", "mean"] = Field(
        "sum", description="Category label scoring: the label's log-likelihood (`sum` of its token log-probs) "
        "or their `mean`, which favours multi-token labels whose later tokens are easy to predict."
    )
    calibration: Literal["auto", "none", "content_free", "rows"] = Field(
        "auto", description="Category label scoring: divide each label's probability by the prompt's own leaning "
        "toward it, then renormalise. `content_free`: its probability when every input is content-free ('N/A', "
        "'', '[MASK]') in the same prompt (contextual calibration, Zhao et al. 2021). `rows`: its mean "
        "probability over up to 256 inputs of the training split, labels unused (batch calibration, Zhou et "
        "al. 2023); estimated when the run is trained (trainer.type none included) and saved with it. `auto`: "
        "rows for a zero-shot run (trainer.type none) that has training rows, where it raised accuracy on 9 of "
        "10 prompt wordings (BENCHMARKS.md), none otherwise; the run's saved config records the choice."
    )

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> OutputFeature:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("a category needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
            if any(not label.strip() or label != label.strip() for label in self.labels):
                raise ValueError("labels must be non-empty and without surrounding spaces")
        return self


class FewShotConfig(Section):
    """Solved examples from the training split placed before each prompt (Ludwig's retrieval)."""

    k: int = Field(4, ge=1, le=32, description="How many solved examples go before each prompt.")
    strategy: Literal["random", "semantic"] = Field(
        "random", description="`random`: a fixed draw per row (seeded by trainer.seed and the row's text); "
        "`semantic`: the most similar training prompts by sentence embedding (the packaged all-MiniLM-L6-v2), "
        "the most similar placed nearest the prompt."
    )
    separator: str = Field("\n\n", description="Text between the examples, and between the last one and the "
                           "prompt.")


class PromptConfig(Section):
    template: str | None = Field(
        None, description="Prompt with `{column}` placeholders; by default the input column(s) as they are."
    )
    task: str | None = Field(None, description="Instruction text placed before the rendered template.")
    use_chat_template: bool = Field(
        False, description="Wrap the prompt as a user turn with the tokenizer's chat template."
    )
    chat_template: str | None = Field(
        None, description="The chat template of conversation data and use_chat_template: null is the tokenizer's "
        "own; a name (`chatml`, `llama3`, `mistral`); or the path of a Jinja file. The run saves it as "
        "chat_template.jinja, and predict, evaluate, serve and export render with it."
    )
    system_prompt: str | None = Field(
        None, description="A system message placed first in every conversation that has none (training and "
        "inference alike; it is part of the saved chat template)."
    )
    few_shot: FewShotConfig | None = Field(
        None, description="Place k solved examples from the training split before each prompt, in training and "
        "at inference alike. A training row never gets itself (or a row with the same text) as an example; "
        "validation and test rows never enter the pool. The pool (and its embeddings) is saved in the run."
    )
    reasoning: Literal["keep", "strip"] = Field(
        "keep", description="Conversation data: `strip` removes `<think>…</think>` blocks from every assistant "
        "turn but the last (as reasoning models see their history); `keep` trains on them as written."
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None and value not in NAMED_TEMPLATES and not is_template_path(value):
            raise ValueError(f"'{value}' is neither a template name ({', '.join(NAMED_TEMPLATES)}) nor the path "
                             "of a Jinja file (ending in .jinja or .j2)")
        return value


class ConversationConfig(Section):
    """Conversation data: one column holds each row's whole chat; assistant turns are the targets."""

    column: str = Field("messages", description="The column holding each conversation (Axolotl's "
                        "field_messages); it serves as the input and output feature.")
    format: Literal["auto", "messages", "sharegpt", "transcript"] = Field(
        "auto", description="`messages`: OpenAI {role, content} lists; `sharegpt`: {from, value} lists; "
        "`transcript`: text with speaker markers (see speakers); `auto`: detected from the first row and logged."
    )
    speakers: dict[str, Literal["system", "user", "assistant", "tool"]] | None = Field(
        None, description="Transcripts: speaker marker -> role, e.g. {'\\n\\nHuman:': user, "
        "'\\n\\nAssistant:': assistant} (the default, hh-rlhf's markers)."
    )
    train_on: Literal["all_assistant", "last_assistant", "everything"] = Field(
        "all_assistant", description="Which tokens train: every assistant turn, the last one only, or every "
        "token of the conversation."
    )
    train_eos: bool = Field(
        True, description="Train the end-of-turn token(s) that close each trained assistant turn, so the model "
        "learns to stop."
    )

    @field_validator("speakers")
    @classmethod
    def _speakers_not_empty(cls, speakers: dict[str, str] | None) -> dict[str, str] | None:
        if speakers is not None and (not speakers or any(not marker.strip() for marker in speakers)):
            raise ValueError("give at least one non-blank speaker marker, e.g. {'Human:': user}")
        return speakers



class PreprocessingConfig(Section):
    split: tuple[float, float, float] = Field(
        (0.9, 0.1, 0.0), description="Train/validation/test fractions when the data has no split column."
    )
    split_column: str | None = Field(
        None, description="Column with values train / validation / test that assigns each row its split."
    )
    max_input_length: int | None = Field(
        None, ge=1, description="Cap on prompt tokens (never above the model's context rule)."
    )
    max_target_length: int | None = Field(None, ge=1, description="Cap on target tokens during training.")
    overlong_prompts: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with prompts longer than the maximum input length."
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part < 0 for part in split) or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and add up to 1, got {list(split)}")
        return split
