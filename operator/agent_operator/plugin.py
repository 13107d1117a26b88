"""The ``kubectl ea`` plugin. Its rollout commands arrive with the blue-green work."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print(
        "kubectl ea: no commands yet (get, status, promote, abort, undo and retry come with rollouts)", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
