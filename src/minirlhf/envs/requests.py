"""The shipped requests of the constraints environment: short everyday asks that a small chat model can answer in a
few sentences, so that a turn's reward is about keeping the user's instructions, not about knowing things.

They are a few templates crossed with topic lists, all written here (nothing is read at run time); `split` divides
them (or any list) into a training and a held-out part.
"""

from __future__ import annotations

import hashlib

from minirlhf import ConfigError

ANIMALS = ("elephants", "dolphins", "owls", "bees", "penguins", "foxes", "whales", "cats", "dogs", "horses", "turtles",
           "octopuses", "eagles", "wolves", "rabbits", "frogs", "butterflies", "giraffes", "lions", "ants", "bats",
           "parrots", "sharks", "camels", "koalas")
SCENES = ("a rainy morning", "a busy market", "a quiet library", "a snowy forest", "a summer beach", "a city at night",
          "a mountain lake", "a crowded train", "a small farm", "a thunderstorm", "a sunrise over the sea",
          "an autumn park", "a school playground", "a desert at noon", "a kitchen before dinner", "a football match",
          "a birthday party", "a foggy harbor", "a garden in spring", "a night sky full of stars", "an old bookshop",
          "a morning cafe", "a long road trip", "a winter evening at home", "a village festival")
EVENTS = ("a job interview", "a first day at school", "a long flight", "a hard exam", "a camping trip",
          "a family dinner", "a first date", "a hiking trip", "a move to a new city", "a big presentation",
          "a new job", "a wedding", "a beach holiday", "a busy week", "a marathon", "a school play",
          "a visit to the dentist", "a rainy weekend", "a team meeting", "a picnic")
SKILLS = ("cooking", "saving money", "sleeping well", "staying focused", "making friends", "public speaking", "running",
          "learning a language", "drawing", "writing", "reading more", "keeping plants alive", "playing chess",
          "swimming", "taking photos", "singing", "managing time", "staying calm", "playing guitar",
          "working from home", "eating healthy", "remembering names", "typing fast", "baking bread", "studying")
CONCEPTS = ("rain", "gravity", "rainbows", "the moon", "volcanoes", "photosynthesis", "money", "the internet",
            "electricity", "sleep", "the seasons", "clouds", "recycling", "vaccines", "tides", "earthquakes", "music",
            "friendship", "maps", "batteries", "soap", "the weather", "stars", "time zones", "email")
FOODS = ("apples", "pizza", "rice", "soup", "chocolate", "tea", "coffee", "bread", "cheese", "pasta", "salad", "honey",
         "pancakes", "tomatoes", "ice cream", "oranges", "eggs", "noodles", "carrots", "bananas", "yogurt", "popcorn",
         "lemons", "potatoes", "beans")

TEMPLATES = (
    (ANIMALS, ("Tell me about {}.", "Give me two fun facts about {}.", "Describe {} to a child.")),
    (SCENES, ("Describe {}.", "Write a short scene about {}.")),
    (EVENTS, ("Give me advice for {}.", "How should I prepare for {}?")),
    (SKILLS, ("How can I get better at {}?", "Give me tips for {}.")),
    (CONCEPTS, ("Explain {} in simple words.", "Explain {} to a ten-year-old.", "Write a short poem about {}.")),
    (FOODS, ("Tell me something interesting about {}.", "Suggest a simple way to enjoy {}.")),
)
"""each topic list with the templates that read naturally with it"""


def _capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


REQUESTS: tuple[str, ...] = tuple(dict.fromkeys(
    _capitalized(template.format(topic)) for topics, templates in TEMPLATES for template in templates for topic in topics
))
"""every shipped request, distinct, in a fixed order (built once, when the module is imported)"""


def split(requests, held_out: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) parts of `requests`, distinct and without overlap, each in the input's order.

    The held-out part is the round(held_out * n) distinct requests that rank first by a hash of (seed, request): the
    same on every machine and Python (no `hash()` randomization), and a request's side mostly stays put when the
    list grows, so a held-out request does not drift into training between versions."""
    if not 0.0 <= held_out < 1.0:
        raise ConfigError(f"held_out must be in [0, 1), got {held_out}")
    distinct = list(dict.fromkeys(requests))
    rank = sorted(distinct, key=lambda r: hashlib.sha256(f"{seed}\0{r}".encode()).hexdigest())
    chosen = set(rank[:round(held_out * len(distinct))])
    return [r for r in distinct if r not in chosen], [r for r in distinct if r in chosen]
