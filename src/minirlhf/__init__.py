"""minirlhf: the complete RLHF pipeline that runs, and reads, on one small machine."""

import os

__version__ = "0.1.0"

ONEDNN_CACHE = "64"
"""oneDNN's primitive cache keeps 1,024 compiled kernels by default, each with its own scratch and reordered weights.
RL batches differ in length every step, so every step compiles new ones: a multi-turn GRPO run on SmolLM2 grew
~50 MB a step (2.3 -> 3.8 GB over 80 steps); at 64 it stayed flat at 2.7 GB after step 7. Set before torch makes its
first kernel; a value in the environment wins."""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, bad config value).

    The CLI prints it as one line and exits with code 2; `--debug` (or MINIRLHF_DEBUG=1) shows the traceback,
    and the cause, which every raise keeps (`raise ... from e`).
    """


class ConfigError(UserError):
    """A config key, value or file that cannot be used. A bad value's error knows its `key` and says `key problem`;
    a command whose keys are flags (flags.py) names the flag instead."""

    def __init__(self, message: str = "", key: str | None = None, problem: str | None = None):
        super().__init__(message if key is None else f"{key} {problem}")
        self.key, self.problem = key, problem


class DataError(UserError):
    """A data file (corpus, prompts, preference pairs) that cannot be read as asked."""


class RunError(UserError):
    """A run directory or checkpoint that is missing, damaged, or of another kind."""


class ModelError(UserError):
    """A model that cannot be loaded or used as asked."""


class MachineError(Exception):
    """A failure of the machine rather than of the user's input or of minirlhf: a database that failed, a thread that
    stopped. The CLI prints it as one line and exits 1 (`--debug` shows the traceback); what was written before is
    intact, every write being atomic."""
