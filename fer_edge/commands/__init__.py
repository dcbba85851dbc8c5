"""The command line's commands, one module per command group.

This is the only layer that chains steps (load -> merge -> export -> check
parity -> write a bundle; load data -> train -> report).  Each module has
``add_<name>_parser(sub)`` (registered in ``fer_edge.cli.COMMANDS``) and
``cmd_<name>(args) -> int``; the library modules they call do one step each.
"""
