"""Human feedback: a small web page where people judge pairs of responses, and the SQLite store behind it.

- store.py: the database (pairs, judgements, what it was made for), export to and import from preference JSONL;
  tokens.py its annotators and their links (expiry, revocation), purpose.py what a database is for, figures.py what
  the admin page shows (agreement between annotators, the policy's win rate);
- pairs.py: what the pairs compare (a policy and its reference, or two samples of one model), where they are stored
  by default, and the background thread that keeps `--ahead` pairs ready;
- app.py: the Flask pages and `serve`, which runs them under waitress; auth.py: who may do what on them.

`minirlhf feedback serve|simulate|export|import|revoke` (commands.py) is the way in.
"""
