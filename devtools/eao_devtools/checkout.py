"""Where the repository checkout is: the tools build from hack/, apply crds/ and examples/, run bench/."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT_VARIABLE = "EAO_REPO_ROOT"


def repo_root() -> Path:
    """The checkout these tools work in.

    devtools is checkout-only (installed editable from devtools/, never shipped), so the checkout is
    found from this package's own file, devtools/eao_devtools/checkout.py, two folders below the
    root; the product package's location plays no part. EAO_REPO_ROOT overrides it, for tools
    installed outside the checkout they should work in.
    """
    override = os.environ.get(REPO_ROOT_VARIABLE)
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[2]
