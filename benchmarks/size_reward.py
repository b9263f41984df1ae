"""The reward of model_size.py, which times steps and learns nothing: a response's length in characters over 100.
It costs nothing beside the models and differs between responses, so GRPO's group advantages are not all zero and
every step does its full update."""


def length(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 100 for r in responses]
