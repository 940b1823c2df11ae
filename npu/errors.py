"""The error every model-loading failure reaches callers as.

`ModelError` (a ValueError) says which part of a model could not be used and what to do;
`npu.model.load_model` is the boundary where the parts' own errors become one.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model that cannot be loaded or whose graphs disagree; the message says which part."""
