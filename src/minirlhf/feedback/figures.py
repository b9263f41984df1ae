"""What the admin page shows of the judgements: agreement between annotators and the policy's win rate."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

from minirlhf import ops


def policy_score(provenance_a: dict, provenance_b: dict, choice: str) -> float | None:
    """How the policy fared in one judgement; None unless the pair is the policy against its reference."""
    roles = (provenance_a.get("role"), provenance_b.get("role"))
    if set(roles) != {"policy", "reference"} or choice not in ("a", "b", "tie"):
        return None
    if choice == "tie":
        return 0.5
    return 1.0 if roles["ab".index(choice)] == "policy" else 0.0


def agreement(labels_per_pair: list[list[str]]) -> dict:
    """Percent agreement and Cohen's kappa between the first and the second label of each doubly-labelled
    pair (every two labels of a pair with more). kappa = (p_o - p_e) / (1 - p_e), where p_e is the agreement
    expected by chance from the two positions' label frequencies; None where p_e = 1 (one label only)."""
    items = [pair for labels in labels_per_pair for pair in combinations(labels, 2)]
    n = len(items)
    if n == 0:
        return {"n": 0, "agreement": None, "kappa": None}
    p_o = sum(x == y for x, y in items) / n
    first, second = Counter(x for x, _ in items), Counter(y for _, y in items)
    p_e = sum(first[c] * second[c] for c in first) / n ** 2
    return {"n": n, "agreement": p_o, "kappa": (p_o - p_e) / (1 - p_e) if p_e < 1 else None}


def win_rate(scores: list[float]) -> dict:
    """The policy's win rate over judgements of policy-vs-reference pairs, ties counting half."""
    return {"n": len(scores), "win_rate": ops.win_rate(scores), "wins": scores.count(1.0),
            "ties": scores.count(0.5), "losses": scores.count(0.0)}
