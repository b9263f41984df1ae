"""What a feedback database was made for: the policy (and reference) whose responses it holds, the prompts they
answer and the sampling settings. A database remembers it (in its `meta` table), so that pairs of another policy or
other settings are never mixed into it without `--mix`."""

from __future__ import annotations

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")
"""the settings that change what a response is like (each response's seed does not: it is recorded with it)"""


def purpose(policy: str, reference: str | None, step: int | None, prompts: str, sampling: dict) -> dict:
    return {"policy": policy, "reference": reference, "step": step, "prompts": prompts,
            "sampling": {k: sampling[k] for k in SAMPLING_KEYS}}


def describe(p: dict) -> str:
    what = (f"two samples of {p['policy']}" if p["reference"] is None else
            f"{p['policy']} (step {p['step']}) against {p['reference']}")
    return f"{what} on {p['prompts']} prompts, " + ", ".join(f"{k} {p['sampling'][k]}" for k in SAMPLING_KEYS)


def differences(was: dict, now: dict) -> str:
    """What differs between two purposes, in words: "temperature 0.7 there, 1.0 now; ..."."""
    if "sampling" not in was:  # a database from before purposes were recorded
        return was["policy"]
    flat = [(k, was.get(k), now.get(k)) for k in ("policy", "reference", "step", "prompts")]
    flat += [(k, was.get("sampling", {}).get(k), now["sampling"][k]) for k in SAMPLING_KEYS]
    return "; ".join(f"{k} {a} there, {b} now" for k, a, b in flat if a != b)


def sides(p: dict) -> set[tuple]:
    """The (model, step, sampling...) of each side of the pairs made for `p`, as their provenance records them."""
    settings = tuple(p["sampling"][k] for k in SAMPLING_KEYS)
    out = {(p["policy"], p["step"] if p["reference"] is not None else None, *settings)}
    if p["reference"] is not None:
        out.add((p["reference"], None, *settings))
    return out


def side_of(provenance: dict) -> tuple | None:
    """A stored response's (model, step, sampling...); None for a response that was not sampled here (imported)."""
    if "model" not in provenance:
        return None
    return (provenance["model"], provenance.get("step"), *(provenance.get(k) for k in SAMPLING_KEYS))
