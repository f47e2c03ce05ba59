"""What every configuration type shares: the frozen base model and the common field types.

Every section of the config (``routes``, ``upstreams``, ``keys``, ``server``...) is built from
these, so that all of them refuse unknown keys, strip whitespace from strings and cannot be
changed once loaded (docs/design.md §2: nothing below the loader sees a YAML dictionary).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Model", "Name", "PositiveSeconds"]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


PositiveSeconds = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=128)]
