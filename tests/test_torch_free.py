"""README's torch-free test run (#21.15): `pip install -e . pytest hypothesis && python -m
pytest -q -m "not slow"` must collect without torch, transformers or OpenCV (the dev
extra's) and skip what needs them, saying why. Checked in a child pytest whose `import
torch` (and cv2, transformers) fails as it does where they are not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MISSING = ("torch", "transformers", "cv2")


def test_the_suite_collects_without_torch(tmp_path):
    for name in MISSING:  # found first on the path: importing it fails as an absent module does
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p",
                          "no:cacheprovider", "-rs", "tests"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "error" not in out.splitlines()[-1], out[-4000:]
    assert "tests collected" in out and "needs torch" in out, out[-4000:]
