"""The installed wheel's metadata, as `importlib.metadata` finds it for the real package.

pyaxengine has no `__version__`; its version lives only in the wheel's metadata
(setup.py `version=`). The stand-in is not pip-installed, so it registers a finder that
answers `importlib.metadata.version("axengine")` with the emulated release's version.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata

from ._release import RELEASE


class StandinDistribution(importlib.metadata.Distribution):
    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: axengine\nVersion: {RELEASE.version}\n"
        return None

    def locate_file(self, path):  # pragma: no cover - nothing is installed on disk
        return path


class StandinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is not None and name.replace("-", "_").lower() == "axengine":
            return iter([StandinDistribution()])
        return iter(())


FINDER = StandinFinder()


def install() -> None:
    import sys

    if not any(isinstance(finder, StandinFinder) for finder in sys.meta_path):
        sys.meta_path.append(FINDER)
