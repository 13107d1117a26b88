"""What the operator and the agent runtime share, and nothing else.

The operator renders pods that the runtime runs; both sides must agree on the runtime's config
schema, where things are mounted, which ports are served, the key-file format, the operation
names and the shape of the tokens the operator mints for smoke tests. Each of those facts is
written once, here. This package imports neither side (an import-linter contract checks it).
"""
