"""The reference backend: numpy graphs built from a Hugging Face checkpoint with exactly the
names, shapes, shape groups and dtypes of the compiled axmodels.

blueprint.py (dimensions from config.json), checkpoint.py (the only place Hugging Face
weight names live), ops.py (float32 kernels), vision.py (InternViT + projector),
graphs.py (the sessions and `build_reference_sessions`); idefics3.py and smolvlm_graphs.py
the same for SmolVLM checkpoints (`build_smolvlm_sessions`).
"""

from npu.reference.graphs import ReferenceGraphs, ReferenceSession, build_reference_sessions

__all__ = ["ReferenceGraphs", "ReferenceSession", "build_reference_sessions"]
