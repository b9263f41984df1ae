"""`minirlhf feedback serve|simulate|export|import|revoke`: the sub-commands of the feedback page and its store, and the
flags they take (cli.py adds them to the `minirlhf` command).

Every sub-command finds its database as serve does: `--db`, else the database of `--policy` (pairs.default_db).
What the user can fix exits 2 with one line; a failure of the machine (the database locked or on a full disk, the
generator thread) exits 1 with one line (cli.py), its traceback under --debug.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minirlhf import UserError
from minirlhf.config import DeviceConfig, setting
from minirlhf.feedback import simulate, store
from minirlhf.flags import add_flags
from minirlhf.feedback.pairs import DEFAULT_POLICY, AnnotatorConfig, PageConfig, Sampling, default_db
from minirlhf.feedback.tokens import TOKEN_DAYS


@dataclass
class StoreConfig:
    """Which database a sub-command reads: --db, else the one `feedback serve` made for --policy."""

    db: str | None = None
    """the SQLite store (default: the --policy's: RUN_DIR/feedback.sqlite for an RL run, else
    runs/feedback/NAME.sqlite)"""
    policy: str = setting(DEFAULT_POLICY, metavar="RUN_DIR|MODEL")
    """an RL run (pairs of it against its reference), or a generator run / model folder / model name (two samples of
    it); without --db, whose database"""


@dataclass
class ServeConfig(PageConfig, Sampling, StoreConfig, DeviceConfig):
    prompts: str | None = setting(None, metavar="FILE.jsonl")
    """prompts to answer (default: the run's own, or the corpus's)"""
    mix: bool = False
    """add these pairs to a --db made for another policy or other settings, on purpose"""
    port: int = setting(8000, ge=0, le=65535)
    """the port the page listens on (0: a free one, printed)"""
    trusted_proxy: bool = False
    """behind a TLS proxy: believe its X-Forwarded-Proto/Host/Port/Prefix headers (https cookies, same-site checks
    and links follow them)"""
    token_days: float = setting(TOKEN_DAYS, gt=0, le=3650)
    """how long a link works, in days (the admin link: from each start)"""
    overlap: float = setting(0.2, ge=0, le=1)
    """fraction of pairs wanted from two annotators"""
    reward_model: list[str] = setting(default_factory=list, metavar="RM_RUN")
    """reward-model run(s) for --select uncertain; give it twice or more for an ensemble"""
    env: str | None = setting(None, metavar="NAME")
    """pairs of whole episodes: two conversations of the environment (constraints, judge or module:Class) from the
    same opening, judged as wholes; needs a chat model"""
    env_turns: int = setting(3, ge=1, metavar="T")
    """with --env: assistant turns per episode at most"""
    env_max_instructions: int = setting(0, ge=0, metavar="N")
    """with --env constraints: instructions a user gives at most (0: one per turn)"""
    temperature: float = 0.7
    """softmax temperature. For a person to judge, serve samples as common chat defaults do (Jan's llama.cpp preset
    for SmolLM2): at temperature 1, SmolLM2-135M-Instruct with its 4-bit-rounded weights writes word salad in about
    half of its tweets; at 0.7 and top_p 0.9 nearly all are English a person can judge, still different enough that
    no pair of 24 was identical (`loop` samples at the policy's own temperature 1)"""
    top_p: float = 0.9
    """nucleus sampling: the smallest set of tokens reaching this probability (1: all)"""
    max_new_tokens: int = 48
    """tokens (an LSTM: words) per response at most; with --env: per turn"""


@dataclass
class SimulateConfig(AnnotatorConfig):
    url: str = setting("", required=True)
    """the page's address (the admin link works too)"""
    token: str | None = None
    """the admin token (default: the token= of --url)"""
    judge: str = setting("", required=True, metavar="RUN_DIR|module:function")
    """a classifier run, a reward-model run, or a function (prompts, responses) -> scores"""
    labels: int = setting(1, ge=1, required=True)
    """A/B judgements to give in all"""
    seed: int = 0
    """seed of the annotators' choices"""
    timeout: float = setting(600.0, gt=0)
    """seconds to wait in all for pairs to judge"""


@dataclass
class ExportConfig(StoreConfig):
    out: str = setting("", required=True, metavar="FILE.jsonl")
    """where the pairs go"""
    force: bool = False
    """replace --out if it exists"""


@dataclass
class ImportConfig(StoreConfig):
    files: list[str] = setting(default_factory=list, positional=True, nargs="+", metavar="FILE.jsonl")
    """{prompt, chosen, rejected} JSONL files"""


@dataclass
class RevokeConfig(StoreConfig):
    name: str = setting("", positional=True, metavar="NAME")
    """the annotator whose link stops"""


def database(cfg: StoreConfig, must_exist: bool = True) -> Path:
    if cfg.db is not None:
        return Path(cfg.db)
    found = default_db(cfg.policy)
    if must_exist and not found.is_file():
        others = sorted(str(p) for p in Path("runs/feedback").glob("*.sqlite"))
        raise UserError(f"no feedback database of {cfg.policy} at {found}; give --db"
                        + (f" (here: {', '.join(others[:5])})" if others else "") + " or the --policy it was served for")
    return found


def serve(cfg: ServeConfig) -> int:
    from minirlhf.feedback.app import serve  # flask and waitress are needed for serving only

    return serve(cfg)


def export(cfg: ExportConfig) -> int:
    db = database(cfg)
    if Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"{cfg.out} exists; give another --out, or --force to replace it")
    n = store.export_jsonl(db, cfg.out)
    print(f"{n} preference pairs from {db} (ties and skips left out) -> {cfg.out}")
    return 0


def revoke(cfg: RevokeConfig) -> int:
    db = database(cfg)
    revoked = store.Store(db, create=False).revoke(cfg.name)
    print(f"{cfg.name}'s link " + ("revoked" if revoked else "was revoked already") + f" in {db}; their "
          "judgements are kept (a new link for the name, made on the admin page, brings them back)")
    return 0


def import_pairs(cfg: ImportConfig) -> int:
    db = database(cfg, must_exist=False)
    added, skipped = store.import_jsonl(cfg.files, db)
    print(f"{added} pairs imported into {db}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


COMMANDS = {
    "serve": (ServeConfig, serve, "serve pairs to judge (default: two samples of smollm2; --policy RL_RUN: the run "
              "against its reference); prints the admin link"),
    "simulate": (SimulateConfig, simulate.main, "judge pairs on a running page as simulated annotators (a judge "
                 "model with Bradley-Terry noise), through its HTTP endpoints as a browser does"),
    "export": (ExportConfig, export, "write the A/B judgements as {prompt, chosen, rejected} JSONL, with the "
               "provenance of each (models, sampling, annotator, time, round); pairs of episodes in TRL's "
               "conversational layout (message lists)"),
    "import": (ImportConfig, import_pairs, "load {prompt, chosen, rejected} JSONL files as judged pairs"),
    "revoke": (RevokeConfig, revoke, "stop an annotator's link (their judgements are kept)"),
}
"""sub-command -> (its config, the function that runs it, its one-line help)"""


def add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="a web page where people judge pairs of responses; export/import them")
    fsub = p.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    for name, (config, run, help) in COMMANDS.items():
        c = fsub.add_parser(name, help=help, description=help, allow_abbrev=False)
        add_flags(c, config)
        c.set_defaults(tool=config, func=run)
