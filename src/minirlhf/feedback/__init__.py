"""Human feedback: a small web page where people judge pairs of responses, and the SQLite store behind it.

- store.py: the database (annotators, pairs, judgements), export to and import from preference JSONL, and the
  figures the admin page shows (agreement between annotators, the policy's win rate);
- pairs.py: what the pairs compare (a policy and its reference, or two samples of one model) and the
  background thread that keeps `--ahead` pairs ready;
- app.py: the Flask pages and `serve`, which runs them under waitress.

`minirlhf feedback serve|export|import` (cli.py) is the way in.
"""
