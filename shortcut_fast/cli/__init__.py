"""The `shortcut-fast` command line: one small module per command family.

A command parses its options, calls the library (shortcut_fast.pipeline for the way from
settings to the analysed model, shortcut_fast.experiments for the analysis) and prints.
Usage errors exit with status 2, refusals with 1, each as one line naming the option or file
(see _common.reported).
"""
from ._common import main
# the command modules register their commands on main
from . import complexity, denetdm, frequency, localize, memorization, tools, train  # noqa: F401,E402

__all__ = ["main"]
