"""The error every model-loading failure reaches callers as.

`ModelError` (a ValueError) says which part of a model could not be used and what to do;
`npu.model.load_model` is the boundary where the parts' own errors become one.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model that cannot be loaded or whose graphs disagree; the message says which part.

    `part` names it when known: "layout", "checkpoint graphs", "board" (axengine and its
    graphs), "graphs", "tokenizer", "template", "embeddings".
    """

    def __init__(self, message: str, part: str | None = None) -> None:
        super().__init__(message)
        self.part = part
