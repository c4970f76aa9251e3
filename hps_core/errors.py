"""Errors raised by hps_core. Each names the field or file at fault and what was expected."""

from __future__ import annotations


class HPSError(Exception):
    """Base class of every error hps_core raises on purpose."""


class ConfigError(HPSError, ValueError):
    """A configuration field has a bad value."""

    def __init__(self, field: str, value: object, expected: str, source: str | None = None):
        self.field = field
        self.value = value
        self.expected = expected
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field}' = {value!r}: expected {expected}")


class ModelFileError(HPSError, ValueError):
    """A sparse model file is missing, truncated or inconsistent."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class InvalidInputError(HPSError, ValueError):
    """A lookup or update request has a bad field (dtype, shape, value)."""

    def __init__(self, field: str, value: object, expected: str):
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"input '{field}' = {value}: expected {expected}")


class UnknownModelError(HPSError, KeyError):
    """A model name is not deployed."""

    def __init__(self, model: str, known: list[str]):
        self.model = model
        super().__init__(f"model '{model}' is not deployed; deployed models: {sorted(known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class UnknownTableError(HPSError, KeyError):
    """A table id or name does not exist in a model."""

    def __init__(self, model: str, table: object, known: list[str]):
        self.model = model
        self.table = table
        super().__init__(
            f"model '{model}' has no table {table!r}; tables: "
            f"{', '.join(f'{i}={n}' for i, n in enumerate(known))}"
        )

    def __str__(self) -> str:
        return self.args[0]


class StorageError(HPSError, RuntimeError):
    """A storage tier failed an operation (names the tier, table and operation)."""
