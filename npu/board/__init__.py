"""The board backend: compiled model directories as they ship (layout.py), axengine
sessions (axengine_session.py) and opening a directory's graphs (graphs.py).
axengine itself is an optional, board-only import."""
