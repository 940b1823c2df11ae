"""Model families (npu/families/base.py says what a family answers); `FAMILIES` by name.

`family_named(name)` -> the family object; `DEFAULT_FAMILY` (InternVL) is what a model
that names none runs as. Which family a checkpoint or package is, is decided where it is
recognised (npu/board/layout.py, npu/reference/), from its config or graph names.
"""

from __future__ import annotations

from npu.families.base import ImageTags, ModelFamily
from npu.families.internvl import INTERNVL
from npu.families.qwen3_vl import QWEN3_VL
from npu.families.smolvlm import SMOLVLM

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (INTERNVL, QWEN3_VL, SMOLVLM)}
DEFAULT_FAMILY = INTERNVL


def family_named(name: str | None) -> ModelFamily:
    """The family registered under `name` (None: the default); ValueError for an unknown one."""
    if name is None:
        return DEFAULT_FAMILY
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of(graphs: object) -> ModelFamily:
    """The family a model or graph set declares (`.family`), else the default."""
    family = getattr(graphs, "family", None)
    return family if isinstance(family, ModelFamily) else DEFAULT_FAMILY


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "ImageTags", "ModelFamily", "family_named", "family_of"]
