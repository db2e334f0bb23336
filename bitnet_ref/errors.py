"""The project's error type and the finding it carries.

Every problem with a model file or a tensor is reported as a Finding: a stable code that tools can
match on, a severity, where it is (file, byte offset, tensor or metadata key), what is wrong and what
to do about it. Code that cannot go on raises ModelError carrying the finding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Finding:
    code: str  # stable, kebab-case, e.g. "tensor-misaligned"
    severity: str  # ERROR, WARNING or INFO
    message: str  # what is wrong, with the numbers
    hint: str  # what to do about it
    path: str | None = None  # the file
    offset: int | None = None  # byte offset in the file
    tensor: str | None = None
    key: str | None = None  # metadata key

    def where(self) -> str:
        parts = []
        if self.path:
            parts.append(str(self.path))
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        if self.tensor:
            parts.append(f"tensor {self.tensor!r}")
        if self.key:
            parts.append(f"key {self.key!r}")
        return ", ".join(parts) or "(no location)"

    def __str__(self) -> str:
        return f"[{self.code}] {self.severity}: {self.message} ({self.where()}). Hint: {self.hint}"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class ModelError(Exception):
    """A model file, tensor or format problem that stops the operation. Carries a Finding."""

    def __init__(self, finding: Finding):
        super().__init__(str(finding))
        self.finding = finding

    @property
    def code(self) -> str:
        return self.finding.code


def model_error(code: str, message: str, hint: str, **where) -> ModelError:
    return ModelError(Finding(code=code, severity=ERROR, message=message, hint=hint, **where))


class FormatError(ValueError):
    """A tensor that a weight format cannot hold (shape, values) or bytes it cannot decode."""
