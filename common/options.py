"""Option fields: a config dataclass field carries its option's help, so the config dataclasses are the one
source of the CLI's defaults and help texts."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["option_field"]


def option_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its option's help (``metadata["help"]``): the config dataclasses are the one
    source of the CLI's defaults and help texts (``pipeline.option``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
