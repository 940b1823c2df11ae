"""NodeArg (stand-in for axengine/_node.py): name, dtype (a numpy dtype), shape (a list)."""


class NodeArg:
    def __init__(self, name, dtype, shape):
        self.name = name
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"NodeArg({self.name!r}, {self.dtype}, {self.shape})"
