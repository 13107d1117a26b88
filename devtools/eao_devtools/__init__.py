"""Development tools for a checkout of the Enterprise Agent Operator (``eao-dev``).

Not part of the product: the local control plane, what ``make run`` does, and the test kit the
tests and the benchmarks share. Installed editable from ``devtools/`` by ``make venv``.
"""
