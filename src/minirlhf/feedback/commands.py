"""`minirlhf feedback serve|simulate|export|import|revoke`: the sub-commands of the feedback page and its store, and the
flags they take (cli.py adds them to the `minirlhf` command).

Every sub-command finds its database as serve does: `--db`, else the database of `--policy` (pairs.default_db).
What the user can fix exits 2 with one line; a failure of the machine (the database locked or on a full disk, the
generator thread) exits 1 with one line (cli.py), its traceback under --debug.
"""

from __future__ import annotations

from pathlib import Path

from minirlhf import UserError
from minirlhf.feedback import simulate, store
from minirlhf.feedback.pairs import DEFAULT_POLICY, PAGE_SAMPLING, add_sampling_flags, default_db
from minirlhf.feedback.tokens import TOKEN_DAYS


def database(args) -> Path:
    if args.db is not None:
        return Path(args.db)
    found = default_db(args.policy)
    if args.feedback_command != "import" and not found.is_file():
        others = sorted(str(p) for p in Path("runs/feedback").glob("*.sqlite"))
        raise UserError(f"no feedback database of {args.policy} at {found}; give --db"
                        + (f" (here: {', '.join(others[:5])})" if others else "") + " or the --policy it was served for")
    return found


def run(args, extra) -> int:
    if args.feedback_command == "serve":
        from minirlhf.feedback.app import serve  # flask and waitress are needed for serving only

        return serve(args)
    if args.feedback_command == "simulate":
        return simulate.main(args)
    db = database(args)
    if args.feedback_command == "export":
        if Path(args.out).exists() and not args.force:
            raise UserError(f"{args.out} exists; give another --out, or --force to replace it")
        n = store.export_jsonl(db, args.out)
        print(f"{n} preference pairs from {db} (ties and skips left out) -> {args.out}")
        return 0
    if args.feedback_command == "revoke":
        revoked = store.Store(db, create=False).revoke(args.name)
        print(f"{args.name}'s link " + ("revoked" if revoked else "was revoked already") + f" in {db}; their "
              "judgements are kept (a new link for the name, made on the admin page, brings them back)")
        return 0
    added, skipped = store.import_jsonl(args.files, db)
    print(f"{added} pairs imported into {db}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


def _add_db(parser) -> None:
    parser.add_argument("--db", help="the SQLite store (default: the --policy's: RUN_DIR/feedback.sqlite for an RL "
                        "run, else runs/feedback/NAME.sqlite)")
    parser.add_argument("--policy", default=DEFAULT_POLICY, metavar="RUN_DIR|MODEL",
                        help="whose database, without --db (default: %(default)s)")


def _add_serve(fsub) -> None:
    s = fsub.add_parser("serve", help="serve pairs to judge (default: two samples of smollm2; --policy RL_RUN: the run "
                        "against its reference); prints the admin link")
    s.add_argument("--policy", default=DEFAULT_POLICY, metavar="RUN_DIR|MODEL", help="an RL run (against its "
                   "reference), or a generator run / model folder / model name (two samples of it); default %(default)s")
    s.add_argument("--prompts", metavar="FILE.jsonl", help="prompts to answer (default: the run's own, or the corpus's)")
    s.add_argument("--db", help="the SQLite store (default: one per policy: RUN_DIR/feedback.sqlite for an RL run, "
                   "else runs/feedback/NAME.sqlite)")
    s.add_argument("--mix", action="store_true", help="add these pairs to a --db made for another policy or other "
                   "settings, on purpose")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shares it on your network (tokens still needed)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--trusted-proxy", action="store_true", help="behind a TLS proxy: believe its X-Forwarded-Proto/"
                   "Host/Port/Prefix headers (https cookies, same-site checks and links follow them)")
    s.add_argument("--token-days", type=float, default=TOKEN_DAYS, help="how long a link works, in days (the admin "
                   "link: from each start); default %(default)g")
    s.add_argument("--ahead", type=int, default=16, help="unjudged pairs kept ready (with --select uncertain: the "
                   "candidates the most uncertain is served from)")
    s.add_argument("--overlap", type=float, default=0.2, help="fraction of pairs wanted from two annotators")
    s.add_argument("--select", default="random", choices=("random", "uncertain"),
                   help="serve the oldest fresh pair, or the one the reward model(s) are least sure about")
    s.add_argument("--reward-model", action="append", default=[], metavar="RM_RUN",
                   help="reward-model run(s) for --select uncertain; give it twice or more for an ensemble")
    s.add_argument("--env", metavar="NAME", help="pairs of whole episodes: two conversations of the environment "
                   "(constraints, judge or module:Class) from the same opening, judged as wholes; needs a chat model")
    s.add_argument("--env-turns", type=int, default=3, metavar="T", help="with --env: assistant turns per episode at "
                   "most (default: %(default)s)")
    s.add_argument("--env-max-instructions", type=int, default=0, metavar="N", help="with --env constraints: "
                   "instructions a user gives at most (0: one per turn)")
    add_sampling_flags(s, PAGE_SAMPLING)  # for people (with --env: --max-new-tokens is per turn)


def _add_simulate(fsub) -> None:
    m = fsub.add_parser("simulate", help="judge pairs on a running page as simulated annotators (a judge model "
                        "with Bradley-Terry noise), through its HTTP endpoints as a browser does")
    m.add_argument("--url", required=True, help="the page's address (the admin link works too)")
    m.add_argument("--token", help="the admin token (default: the token= of --url)")
    m.add_argument("--judge", required=True, metavar="RUN_DIR|module:function",
                   help="a classifier run, a reward-model run, or a function (prompts, responses) -> scores")
    m.add_argument("--labels", type=int, required=True, help="A/B judgements to give in all")
    m.add_argument("--beta", type=float, default=1.0, help="P(A) = sigmoid(beta (r_A - r_B)); higher agrees "
                   "with the judge more often")
    m.add_argument("--annotators", type=int, default=1, help="simulated annotators, taking turns")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--timeout", type=float, default=600.0, help="seconds to wait in all for pairs to judge")


def add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="a web page where people judge pairs of responses; export/import them")
    fsub = p.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    _add_serve(fsub)
    _add_simulate(fsub)
    e = fsub.add_parser("export", help="write the A/B judgements as {prompt, chosen, rejected} JSONL, with the "
                        "provenance of each (models, sampling, annotator, time, round); pairs of episodes in TRL's "
                        "conversational layout (message lists)")
    _add_db(e)
    e.add_argument("--out", required=True, metavar="FILE.jsonl")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    i = fsub.add_parser("import", help="load {prompt, chosen, rejected} JSONL files as judged pairs")
    i.add_argument("files", nargs="+", metavar="FILE.jsonl")
    _add_db(i)
    r = fsub.add_parser("revoke", help="stop an annotator's link (their judgements are kept)")
    r.add_argument("name", metavar="NAME")
    _add_db(r)
    p.set_defaults(func=run)
