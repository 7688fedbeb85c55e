"""Import a bundle's ``scripts`` package in tests without the name clashes of ``import scripts``.

Every bundle ships a package called ``scripts`` (the model-zoo convention), so several bundles
cannot be imported as ``scripts`` in one process. Tests load each one under a unique name.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"


def import_bundle_scripts(bundle: str, module: str):
    """Return ``bundles/<bundle>/scripts/<module>.py`` imported as ``_<bundle>_scripts.<module>``."""
    package = f"_{bundle}_scripts"
    if package not in sys.modules:
        folder = BUNDLES / bundle / "scripts"
        spec = importlib.util.spec_from_file_location(
            package, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[package] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"{package}.{module}")
