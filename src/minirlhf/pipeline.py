"""`minirlhf demo`: the whole pipeline that exists so far, on the offline default corpus."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from minirlhf.algorithms.classifier import ClassifierConfig, ClassifierModelConfig, ClassifierTrainConfig
from minirlhf.algorithms.generator import GeneratorConfig
from minirlhf.config import DataConfig, save_config
from minirlhf.runtime import DEVICES, make_run_dir, peak_memory_mb


def _demo_classifier() -> ClassifierConfig:
    return ClassifierConfig(data=DataConfig(max_train=6000, max_eval=1000),
                            model=ClassifierModelConfig(freeze_layers=4, max_length=64),
                            train=ClassifierTrainConfig(epochs=2))


@dataclass
class DemoConfig:
    data: str = "tweets"
    """corpus for every stage (name, folder or file; see --data)"""
    classifier: ClassifierConfig = field(default_factory=_demo_classifier)
    """stage 1, with quicker defaults than train-classifier's"""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """stage 3, as train-generator's defaults"""
    out: str | None = None
    """run directory; each stage writes a subfolder (default: a new folder under runs/)"""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda or mps"""
    seed: int = 0
    """seed of every stage"""

    checks = {"device": DEVICES}


def _stage(cfg, demo: DemoConfig, out: Path):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=demo.data),
                               out=str(out), device=demo.device, seed=demo.seed)


def run_demo(cfg: DemoConfig) -> Path:
    from minirlhf.algorithms import classifier, generator
    from minirlhf.models.classifier import SentimentClassifier

    t0 = time.time()
    run_dir = make_run_dir(cfg.out, "demo")
    save_config(cfg, run_dir / "config.yaml")
    print(f"== 1/3 reward classifier -> {run_dir / 'classifier'}")
    clf_dir = classifier.train(_stage(cfg.classifier, cfg, run_dir / "classifier"))
    print(f"== 2/3 LSTM generator -> {run_dir / 'generator'}")
    gen_dir = generator.train(_stage(cfg.generator, cfg, run_dir / "generator"))

    print("== 3/3 the classifier scores the generator's samples (the reward RLHF will raise)")
    model, vocab = generator.load_generator(gen_dir)
    s = cfg.generator.samples
    rows = generator.generate_texts(model, vocab, s.prompts, s.n, s.max_new_tokens, s.temperature, s.top_k, s.top_p, seed=cfg.seed)
    probs, logits = SentimentClassifier.from_run(clf_dir).score([f"{p} {c}" for p, c in rows])
    for (p, c), prob in zip(rows, probs.tolist()):
        print(f"  P(positive)={prob:.2f}  {p} {c}")
    print(f"mean P(positive) of samples {probs.mean():.3f}, mean positive logit {logits.mean():.3f}")
    print(f"\ndemo finished in {time.time() - t0:.0f}s, peak memory {peak_memory_mb():.0f} MB")
    print(f"run directory: {run_dir}")
    print(f"  plots:   {clf_dir / 'loss.png'}, {clf_dir / 'accuracy.png'}, {gen_dir / 'perplexity.png'}")
    print(f"  samples: {gen_dir / 'samples.md'}")
    return run_dir
