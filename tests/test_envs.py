"""The constraints environment and its verifiable instructions: every check against hand-written replies, conflicting
kinds never drawn together, episodes fixed by their seed, rewards the share of instructions kept, and the requests'
split. Pure Python, no model: the whole file runs in well under a second."""

import itertools
import random
from types import SimpleNamespace

import pytest

from minirlhf import ConfigError
from minirlhf.envs import verifiers as v
from minirlhf.envs.constraints import AGAIN, ConstraintsEnv
from minirlhf.envs.requests import REQUESTS, split


def test_words():
    assert v.words("Don't stop, rock-and-roll 3.5!") == ["Don't", "stop", "rock", "and", "roll", "3", "5"]
    assert v.words("  ...  ") == []


@pytest.mark.parametrize("text,n,ok", [
    ("one two three", 3, True), ("one two three four", 3, False), ("", 3, False), ("!!!", 3, False),
    ("a - b", 2, True), ("don't", 1, True),
])
def test_max_words(text, n, ok):
    assert v.max_words(text, n=n) is ok


@pytest.mark.parametrize("text,ok", [
    ("all quiet here.", True), ("All quiet.", False), ("quiet, I think", False), ("", False), ("123 !", True),
    ("caf\u00e9 \u00c9t\u00e9", False),
])
def test_lowercase(text, ok):
    assert v.lowercase(text) is ok


@pytest.mark.parametrize("text,ok", [("no commas here.", True), ("one, two", False), ("", False), (" ", False)])
def test_no_commas(text, ok):
    assert v.no_commas(text) is ok


@pytest.mark.parametrize("text,ok", [
    ("The Sun rose.", True), ("sun", True), ("It was sunny.", False), ("The sun's light.", False), ("", False),
    ("under the sun!", True),
])
def test_include_word(text, ok):
    assert v.include_word(text, word="sun") is ok


@pytest.mark.parametrize("text,ok", [
    ("Every day is fine.", True), ("It is Very fine.", False), ("very", False), ("", False), ("...", False),
])
def test_no_word(text, ok):
    assert v.no_word(text, word="very") is ok


@pytest.mark.parametrize("text,ok", [
    ("Sure, here it is.", True), ("  **Sure**! fine", True), ("sure", True), ("- sure thing", True),
    ("Surely not.", False), ("Yes, sure.", False), ("", False),
])
def test_start_with(text, ok):
    assert v.start_with(text, word="sure") is ok


@pytest.mark.parametrize("text,ok", [
    ("Eat well. Hope this helps.", True), ("eat well. hope this helps", True), ("Hope this helps!!  \n", True),
    ("Hope  this\nhelps?", True), ("Hope this helps :)", False), ("hope this helps, Tom.", False),
    ("I hope this helps you.", False), ("", False), ("hope this", False),
])
def test_end_with(text, ok):
    assert v.end_with(text, phrase="hope this helps") is ok


def test_end_with_needs_a_word_boundary():
    assert v.end_with("That is the end.", phrase="the end")
    assert not v.end_with("bathe end.", phrase="the end")


@pytest.mark.parametrize("text,n,ok", [
    ("One sentence.", 1, True), ("One sentence", 1, True), ("One. Two! Three?", 3, True), ("One. Two", 2, True),
    ("It costs 3.5 dollars. Cheap.", 2, True), ("Wait... what?!", 2, True), ("...", 0, True), ("", 1, False),
    ("One.\nTwo.", 2, True), ("line one\nline two", 1, True), ("One. Two.", 1, False),
])
def test_sentences(text, n, ok):
    assert v.sentences(text, n=n) is ok


@pytest.mark.parametrize("text,n,ok", [
    ("- a\n- b", 2, True), ("Here:\n- a\n* b\n  - c\nThat is all.", 3, True), ("- a\n- b\n- c", 2, False),
    ("-a\n- b", 2, False), ("**bold**\n- a\n- b", 2, True), ("- \n- a\n- b", 2, True), ("1. a\n2. b", 2, False),
    ("", 2, False), ("\u2022 a\n\u2022 b", 2, False),
])
def test_bullets(text, n, ok):
    assert v.bullets(text, n=n) is ok


@pytest.mark.parametrize("text,ok", [
    ("This is NOW.", True), ("OK then", True), ("I am here.", False), ("A1 and B2", False), ("", False),
    ("I'M here", True),
])
def test_uppercase_word(text, ok):
    assert v.uppercase_word(text) is ok


def test_instruction_checks_its_kind_and_reads_as_a_clause():
    inst = v.make("end_with", phrase="the end")
    assert inst.text == 'End your answer with the words "the end".'
    assert inst.clause == 'end your answer with the words "the end"'
    assert inst.check("And that was the end.") and not inst.check("The end is near.")
    assert v.make("sentences", n=1).text == "Answer in exactly 1 sentence."
    assert v.make("bullets", n=3).clause.endswith('starting with "- "')
    with pytest.raises(KeyError):
        v.make("rhyme")


def test_every_kind_is_drawn_phrased_and_checkable():
    rng = random.Random(0)
    for kind, spec in v.KINDS.items():
        inst = v.make(kind, **spec.draw(rng))
        assert inst.text[0].isupper() and inst.text.endswith(".")
        assert isinstance(inst.check("Sure, a reply."), bool) and inst.check("") is False


def test_word_lists_do_not_clash():
    listed = [set(v.INCLUDE_WORDS), set(v.AVOID_WORDS), set(v.START_WORDS),
              {w for p in v.END_PHRASES for w in p.split()}]
    for a, b in itertools.combinations(listed, 2):
        assert not a & b


def test_conflicting_kinds_are_never_given_together():
    seen = set()
    for seed in range(2000):
        env = ConstraintsEnv(turns=4)
        env.reset(seed)
        kinds = [i.kind for i in env.plan]
        assert len(kinds) == 4 and len(set(kinds)) == 4
        assert not any(v.conflicts(a, b) for a, b in itertools.combinations(kinds, 2))
        seen.update(kinds)
    assert seen == set(v.KINDS)


def test_a_satisfying_reply_exists_for_every_drawn_episode():
    """Every pair of kinds drawn together can be kept by one reply (spot-checked on hand-built combinations)."""
    inst = [v.make("max_words", n=15), v.make("bullets", n=4), v.make("start_with", word="sure"),
            v.make("end_with", phrase="the end"), v.make("lowercase"), v.make("no_commas"),
            v.make("include_word", word="sun"), v.make("no_word", word="very")]
    reply = "sure:\n- sun\n- rain\n- snow\n- wind\nthe end."
    assert all(i.check(reply) for i in inst)
    inst = [v.make("sentences", n=2), v.make("uppercase_word"), v.make("start_with", word="yes"),
            v.make("end_with", phrase="thank you")]
    assert all(i.check("Yes it is BIG. Thank you!") for i in inst)


def test_reset_is_fixed_by_its_seed():
    a, b = ConstraintsEnv(turns=3), ConstraintsEnv(turns=3, seed=7)
    assert a.reset(5) == b.reset(5) and a.plan == b.plan
    first = a.reset(5)
    assert first[0]["role"] == "user" and first[0]["content"] == f"{a.request} {a.plan[0].text}"
    openings = {ConstraintsEnv(turns=3).reset(s)[0]["content"] for s in range(50)}
    assert len(openings) > 40


def test_the_instructions_do_not_depend_on_the_replies():
    def run(reply):
        env = ConstraintsEnv(turns=3)
        convo = env.reset(11)
        messages = []
        for _ in range(3):
            convo.append({"role": "assistant", "content": reply})
            msg, _, done, _ = env.step(convo)
            messages.append(msg)
            if not done:
                convo.append({"role": "user", "content": msg})
        return messages
    assert run("yes.") == run("Some OTHER reply, with commas.")


def test_rewards_are_the_share_kept_earlier_instructions_included():
    env = ConstraintsEnv(prompts=["Describe a cat."], turns=3)
    convo = env.reset(3)
    # a known plan in place of the drawn one, so that the replies below can be written by hand
    env.plan = [v.make("start_with", word="sure"), v.make("no_commas"), v.make("max_words", n=15)]
    convo.append({"role": "assistant", "content": "Sure, cats purr."})
    msg, reward, done, info = env.step(convo)
    assert (reward, done) == (1.0, False)
    assert info == {"turn": 1, "instructions": ["start_with"], "satisfied": {"start_with": True}, "all": True}
    assert msg == "Now answer again, and this time do not use any commas. Keep to what I asked before."
    convo += [{"role": "user", "content": msg}, {"role": "assistant", "content": "Sure, cats purr."}]
    msg, reward, done, info = env.step(convo)
    assert (reward, done, info["all"]) == (0.5, False, False)
    assert info["satisfied"] == {"start_with": True, "no_commas": False}
    assert msg.startswith("Now answer again, and this time answer in at most 15 words.")
    convo += [{"role": "user", "content": msg}, {"role": "assistant", "content": "Cats purr softly."}]
    msg, reward, done, info = env.step(convo)
    assert (msg, reward, done, info["turn"]) == (None, pytest.approx(2 / 3), True, 3)
    with pytest.raises(RuntimeError):
        env.step(convo)


@pytest.mark.parametrize("turns", [1, 2, 5])
def test_done_after_turns_steps(turns):
    env = ConstraintsEnv(turns=turns)
    convo = env.reset(0)
    dones = []
    for _ in range(turns):
        convo.append({"role": "assistant", "content": "ok"})
        msg, reward, done, info = env.step(convo)
        dones.append(done)
        assert 0.0 <= reward <= 1.0 and (msg is None) == done
        if msg is not None:
            convo.append({"role": "user", "content": msg})
    assert dones == [False] * (turns - 1) + [True]


def test_max_instructions_caps_the_new_instructions():
    env = ConstraintsEnv(turns=4, config=SimpleNamespace(max_instructions=2))
    convo = env.reset(1)
    assert len(env.plan) == 2
    messages, counts = [], []
    for _ in range(4):
        convo.append({"role": "assistant", "content": "ok"})
        msg, _, done, info = env.step(convo)
        counts.append(len(info["instructions"]))
        if not done:
            messages.append(msg)
            convo.append({"role": "user", "content": msg})
    assert counts == [1, 2, 2, 2]
    assert messages[0].startswith("Now answer again") and messages[1:] == [AGAIN, AGAIN]
    every_turn = ConstraintsEnv(turns=3, config=SimpleNamespace(max_instructions=0))
    every_turn.reset(1)
    assert len(every_turn.plan) == 3


def test_more_turns_than_compatible_kinds_repeat_the_request():
    env = ConstraintsEnv(turns=12)
    env.reset(2)
    assert len(env.plan) == len(v.KINDS) - len(v.CONFLICTS)


def test_step_refuses_misuse():
    env = ConstraintsEnv()
    with pytest.raises(RuntimeError):
        env.step([{"role": "assistant", "content": "hi"}])
    convo = env.reset(0)
    with pytest.raises(ValueError):
        env.step(convo)
    with pytest.raises(ConfigError):
        ConstraintsEnv(turns=0)


def test_shipped_requests():
    assert len(REQUESTS) >= 300 and len(set(REQUESTS)) == len(REQUESTS)
    assert all(r[0].isupper() and r[-1] in ".?" and len(r) < 80 for r in REQUESTS)
    env = ConstraintsEnv(prompts=[])
    assert env.prompts == list(REQUESTS)
    assert ConstraintsEnv(prompts=["Only this."]).reset(4)[0]["content"].startswith("Only this. ")


def test_split_is_deterministic_and_disjoint():
    train, held = split(REQUESTS)
    assert (train, held) == split(list(REQUESTS))
    assert not set(train) & set(held) and set(train) | set(held) == set(REQUESTS)
    assert len(held) == round(0.2 * len(REQUESTS))
    assert split(REQUESTS, seed=1) != (train, held)
    assert split(["a", "a", "b"], held_out=0.5) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split(REQUESTS, held_out=0.0) == (list(REQUESTS), [])
    with pytest.raises(ConfigError):
        split(REQUESTS, held_out=1.0)


def test_kinds_limit_what_a_user_asks_for_and_an_unknown_kind_stops():
    from minirlhf.envs.base import EnvConfig

    env = ConstraintsEnv(turns=3, config=EnvConfig(kinds="no_commas,max_words,lowercase"))
    for seed in range(50):
        env.reset(seed)
        assert {i.kind for i in env.plan} <= {"no_commas", "max_words", "lowercase"} and len(env.plan) == 3
    with pytest.raises(ConfigError, match="unknown instruction kind 'commas'"):
        ConstraintsEnv(turns=2, config=EnvConfig(kinds="commas"))
