"""The base of every config section, and how cross-field problems are reported at their key paths."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from tunewright.config_messages import SETTING_ERROR

Location = tuple[str | int, ...]


def refuse(title: str, problems: list[tuple[Location, str]]) -> None:
    """Report several cross-field problems at once, each at its own key path (relative to the section)."""
    if problems:
        details = [
            InitErrorDetails(type=PydanticCustomError(SETTING_ERROR, "{message}", {"message": message}),
                             loc=location, input=None)
            for location, message in problems
        ]
        raise ValidationError.from_exception_data(title, details)


def changed(section: BaseModel, key: str) -> bool:
    """The key holds something other than its default (resolved configs hold every key)."""
    return bool(getattr(section, key) != type(section).model_fields[key].get_default(call_default_factory=True))


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan=False: no setting means anything at NaN or infinity (a learning rate of inf was accepted).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
