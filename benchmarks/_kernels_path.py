"""Make ``acttail.kernels`` importable from a plain checkout (the device machine has no install).

setup.cfg maps ``acttail.kernels`` to ``kernels/``; where the package is not installed with that mapping,
load the folder under that name so benchmarks and tests import it the same way package code does."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_kernels():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import acttail.kernels  # noqa: F401
        return
    except ModuleNotFoundError:
        pass
    import acttail
    spec = importlib.util.spec_from_file_location("acttail.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["acttail.kernels"] = mod
    spec.loader.exec_module(mod)
    acttail.kernels = mod
