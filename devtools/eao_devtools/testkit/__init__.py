"""What the tests and the benchmarks both use: a kubectl wrapper, the operator and the agent runtime
as processes, example manifests. The pytest fixtures built on these stay in tests/."""
