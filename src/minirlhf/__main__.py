"""`python -m minirlhf`: the entry point torchrun starts in every process."""

import os
import sys

from minirlhf.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun member leaves without the interpreter's finalization: its run has ended (files written and closed,
    # process group destroyed), and in that finalization gloo's threads now and then aborted a process that had
    # done all its work (SIGABRT, "terminate called without an active exception"), failing the whole torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
