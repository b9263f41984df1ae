"""Health checks of an RL run, read from each step's metrics row: the failures that RLHF users report most in TRL's
and OpenRLHF's issues are silent ones, and each of these says in one line what went wrong and which flag fixes it.

- truncation: nearly every response hits response_len without ending (TRL #5697, #6263): the rewards then judge
  cut-off text, often alike, and nothing useful is learned;
- flat groups: in most groups every response got the same reward, so the group baseline leaves no advantage;
- KL: far above its target, or still climbing steadily past it: the policy is leaving the reference (TRL #204's
  collapse). A KL that climbs from 0 towards its target is what training starts with, and is not flagged;
- length drift: mean response length beyond a factor of 2 of the start, up or down (the reward paying for length);
- diversity collapse: the batch's distinct-2 below half the start's (one answer for every prompt);
- reward hacking: the reward rising while the responses' perplexity under the reference has doubled (TRL #6058:
  text the reference finds unlikely, such as repetition, scoring well);
- over-optimisation: with a reward-model ensemble, the reward model's score rising while its members disagree on
  the policy's samples half as much again as at the start: the policy is moving where the labels did not reach,
  the early sign that the true reward will peak and fall (Gao et al., 2022; Coste et al., 2024). No gold judge
  is needed to see it.

`--guards warn` (the default) prints each condition once, the step it first held and the fix, and lists them in
report.md's Health section; `--guards strict` stops the run there instead, its last checkpoint intact; `off` checks
nothing. Every process computes the same rows, so under torchrun all of them stop together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minirlhf import UserError

UNENDED_SHARE = 0.9  # share of responses that never end
FLAT_GROUP_SHARE = 0.5  # share of groups with zero reward variance
KL_FACTOR = 3.0  # KL above this many times kl_target
KL_RISE = (10, 2.0)  # KL rising over this many steps, by this factor, and past kl_target
LENGTH_FACTOR = 2.0  # mean response length beyond this factor of the start's
DISTINCT_FLOOR = 0.5  # distinct-2 below this share of the start's
PPL_FACTOR = 2.0  # reference perplexity beyond this factor of the start's while the reward rose
DISAGREEMENT_FACTOR = 1.5  # the ensemble's std on the samples beyond this factor of the start's while its score rose
SMOOTH = 3  # steps averaged for "now" and "the start" of the drifting metrics


@dataclass
class Guards:
    mode: str = "warn"
    """warn, strict or off"""
    kl_target: float = 6.0
    group_size: int = 1
    history: list[dict] = field(default_factory=list)
    """the metrics the checks read, one dict per step (the first SMOOTH and the last KL_RISE[0] are kept)"""
    fired: list[dict] = field(default_factory=list)
    """{"step", "guard", "message"} of each condition, the first step it held"""

    KEYS = ("reward/mean", "objective/kl", "response/length", "response/ended", "response/distinct_2",
            "response/ref_ppl", "reward/flat_groups", "reward/reward_model", "reward/ensemble_std")

    def check(self, step: int, row: dict) -> list[str]:
        """Read a step's row; the lines of the conditions that hold for the first time (raises under strict)."""
        if self.mode == "off":
            return []
        self.history.append({k: row[k] for k in self.KEYS if k in row})
        keep = max(KL_RISE[0], SMOOTH)
        if len(self.history) > SMOOTH + keep:  # the start and the recent window are all the checks read
            del self.history[SMOOTH]
        new = []
        for name, check in CHECKS.items():
            message = None if any(f["guard"] == name for f in self.fired) else check(self)
            if message:
                self.fired.append({"step": step, "guard": name, "message": message})
                new.append(f"health check '{name}' at step {step}: {message}")
        if new and self.mode == "strict":
            raise UserError(f"{new[0]} (--guards strict stopped the run; its last checkpoint is intact; "
                            "--guards warn only warns)")
        return new

    def state(self) -> dict:
        return {"history": self.history, "fired": self.fired}

    def load(self, state: dict | None) -> None:
        if state:
            self.history, self.fired = list(state["history"]), list(state["fired"])

    # ------------------------------------------------------------------ the series the checks read
    def series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if key in h]

    def start_and_now(self, key: str) -> tuple[float, float] | None:
        """Means of the first and the last SMOOTH values (None until there are 2 x SMOOTH of them)."""
        xs = self.series(key)
        if len(xs) < 2 * SMOOTH:
            return None
        return sum(xs[:SMOOTH]) / SMOOTH, sum(xs[-SMOOTH:]) / SMOOTH


def _truncation(g: Guards) -> str | None:
    ended = g.series("response/ended")
    if ended and 1 - ended[-1] >= UNENDED_SHARE:
        return (f"{1 - ended[-1]:.0%} of the responses hit response_len without ending, so the reward judges cut-off "
                "text; raise --response_len (or penalise it: --reward.unended_weight=-1)")
    return None


def _flat_groups(g: Guards) -> str | None:
    flat = g.series("reward/flat_groups")
    if g.group_size > 1 and flat and flat[-1] > FLAT_GROUP_SHARE:
        return (f"in {flat[-1]:.0%} of the groups every response got the same reward, so they teach nothing; raise "
                f"--group_size (now {g.group_size}) or use a reward that tells the responses apart")
    return None


def _kl(g: Guards) -> str | None:
    kl = g.series("objective/kl")
    if kl and kl[-1] > KL_FACTOR * g.kl_target:
        return (f"KL from the reference is {kl[-1]:.1f} nats, over {KL_FACTOR:g}x kl_target ({g.kl_target:g}); "
                "raise --kl_coef or lower --train.lr")
    steps, factor = KL_RISE
    recent = kl[-steps:]
    if len(recent) == steps and recent[-1] > g.kl_target and recent[-1] > factor * max(recent[0], 1e-3) and \
            sum(b > a for a, b in zip(recent, recent[1:])) >= 0.7 * (steps - 1):
        return (f"KL from the reference rose steadily from {recent[0]:.2f} to {recent[-1]:.2f} nats over {steps} "
                f"steps, past kl_target ({g.kl_target:g}); raise --kl_coef or lower --train.lr before the policy "
                "collapses")
    return None


def _length(g: Guards) -> str | None:
    both = g.start_and_now("response/length")
    if both and both[0] > 0 and not 1 / LENGTH_FACTOR <= both[1] / both[0] <= LENGTH_FACTOR:
        return (f"mean response length went from {both[0]:.1f} to {both[1]:.1f} tokens: the reward may be paying for "
                "length; raise --kl_coef or weigh length in the reward (--reward.length_weight)")
    return None


def _diversity(g: Guards) -> str | None:
    both = g.start_and_now("response/distinct_2")
    if both and both[1] < DISTINCT_FLOOR * both[0]:
        return (f"distinct-2 of the responses fell from {both[0]:.2f} to {both[1]:.2f}: the policy gives the same "
                "answer to different prompts; raise --kl_coef or lower --train.lr")
    return None


def _reward_hacking(g: Guards) -> str | None:
    reward, ppl = g.start_and_now("reward/mean"), g.start_and_now("response/ref_ppl")
    if reward and ppl and reward[1] > reward[0] and ppl[1] > PPL_FACTOR * ppl[0]:
        return (f"the reward rose ({reward[0]:.2f} -> {reward[1]:.2f}) while the responses' perplexity under the "
                f"reference went from {ppl[0]:.1f} to {ppl[1]:.1f}: the policy may be gaming the reward; read "
                "samples.md, raise --kl_coef or penalise repetition (--reward.repetition_weight=-1)")
    return None


def _over_optimisation(g: Guards) -> str | None:
    proxy, spread = g.start_and_now("reward/reward_model"), g.start_and_now("reward/ensemble_std")
    if proxy and spread and proxy[1] > proxy[0] and spread[1] > DISAGREEMENT_FACTOR * spread[0]:
        return (f"the reward model's score rose ({proxy[0]:.2f} -> {proxy[1]:.2f}) while its ensemble's members came to "
                f"disagree on the policy's samples ({spread[0]:.2f} -> {spread[1]:.2f} std): the policy is leaving what "
                "the labels taught, and the true reward may soon fall; use --reward.ensemble=uwo (or wco), raise "
                "--kl_coef, or label the current policy's samples (`minirlhf loop`)")
    return None


CHECKS = {"truncation": _truncation, "flat_groups": _flat_groups, "kl": _kl, "length_drift": _length,
          "diversity_collapse": _diversity, "reward_hacking": _reward_hacking, "over_optimisation": _over_optimisation}
