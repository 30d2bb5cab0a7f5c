"""Builds the API reference from the docstrings with pdoc, every warning an error.

    python docs/api.py [OUTPUT_DIR]     (default build/api; .ci/run builds it)

One warning is let through: pdoc cannot resolve the postponed annotations of a ``NamedTuple``'s
generated ``__init__`` (it evaluates them outside their module); the fields' own annotations,
which the reference shows, resolve.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    import pdoc

    out = Path(argv[0]) if argv else ROOT / "build" / "api"
    # The library's public modules, then the application (jaxnet.app: pdoc adds its modules); internal
    # modules (_name) are left out.
    library = sorted(f"jaxnet.{p.stem}" for p in (ROOT / "jaxnet").glob("*.py") if not p.stem.startswith("_"))
    modules = [*library, "jaxnet.app"]
    warnings.filterwarnings("error")
    warnings.filterwarnings(
        "ignore", message=r"Error parsing type annotation .* for jaxnet(\.\w+)+\.__init__\.", category=UserWarning
    )
    pdoc.pdoc("jaxnet", *modules, output_directory=out)
    print(f"API reference of {len(modules)} modules in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
