"""`minirlhf feedback serve|simulate|export|import`: the sub-commands of the feedback page and its store, and the
flags they take (cli.py adds them to the `minirlhf` command)."""

from __future__ import annotations

from minirlhf.feedback import simulate, store
from minirlhf.feedback.pairs import PAGE_SAMPLING, add_sampling_flags


def run(args, extra) -> int:
    if args.feedback_command == "serve":
        from minirlhf.feedback.app import serve  # flask and waitress are needed for serving only

        return serve(args)
    if args.feedback_command == "simulate":
        return simulate.main(args)
    if args.feedback_command == "export":
        n = store.export_jsonl(args.db, args.out)
        print(f"{n} preference pairs (ties and skips left out) -> {args.out}")
        return 0
    added, skipped = store.import_jsonl(args.files, args.db)
    print(f"{added} pairs imported into {args.db}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


def add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="a web page where people judge pairs of responses; export/import them")
    fsub = p.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    db = {"default": "runs/feedback/feedback.sqlite", "help": "the SQLite store (default: %(default)s)"}
    s = fsub.add_parser("serve", help="serve pairs to judge (default: the newest RL run under runs/ against its "
                        "reference, else two samples of smollm2); prints the admin link")
    s.add_argument("--policy", metavar="RUN_DIR|MODEL", help="an RL run (against its reference), or a generator "
                   "run / model folder / model name (two samples of it)")
    s.add_argument("--prompts", metavar="FILE.jsonl", help="prompts to answer (default: the run's own, or the corpus's)")
    s.add_argument("--db", **db)
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 shares it on your network (tokens still needed)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--ahead", type=int, default=16, help="unjudged pairs kept ready (with --select uncertain: the "
                   "candidates the most uncertain is served from)")
    s.add_argument("--overlap", type=float, default=0.2, help="fraction of pairs wanted from two annotators")
    s.add_argument("--select", default="random", choices=("random", "uncertain"),
                   help="serve the oldest fresh pair, or the one the reward model(s) are least sure about")
    s.add_argument("--reward-model", action="append", default=[], metavar="RM_RUN",
                   help="reward-model run(s) for --select uncertain; give it twice or more for an ensemble")
    add_sampling_flags(s, PAGE_SAMPLING)  # for people
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
    e = fsub.add_parser("export", help="write the A/B judgements as {prompt, chosen, rejected} JSONL")
    e.add_argument("--db", **db)
    e.add_argument("--out", required=True, metavar="FILE.jsonl")
    i = fsub.add_parser("import", help="load {prompt, chosen, rejected} JSONL files as judged pairs")
    i.add_argument("files", nargs="+", metavar="FILE.jsonl")
    i.add_argument("--db", **db)
    p.set_defaults(func=run)
