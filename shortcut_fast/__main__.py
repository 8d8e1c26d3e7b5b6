"""`python -m shortcut_fast ...` runs the command line (so `torchrun -m shortcut_fast <command>` works)."""
from shortcut_fast.cli import main

if __name__ == "__main__":
    main(prog_name="shortcut-fast")
