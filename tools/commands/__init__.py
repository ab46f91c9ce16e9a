"""Sub-commands of the `paramcast` CLI, one module each (see tools/cli.py)."""
