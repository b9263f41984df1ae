"""The one reward every system in sentiment_rlhf.py optimises, minirlhf and TRL alike: the positive logit
of the stage-1 sentiment classifier (the run directory in $MINIRLHF_BENCH_CLASSIFIER) on each response."""

import os

_classifier = None


def positive_logit(prompts: list[str], responses: list[str]) -> list[float]:
    global _classifier
    if _classifier is None:
        from minirlhf.models.classifier import SentimentClassifier

        _classifier = SentimentClassifier.from_run(os.environ["MINIRLHF_BENCH_CLASSIFIER"], "cpu")
    return _classifier.score([r.strip() for r in responses])[1].tolist()
