"""Reward models: one seam (`reward.base.RewardModel`), chosen by `reward.kind` in the config.

Built-in kinds (reward/registry.py):
    bradley_terry  any one-label AutoModelForSequenceClassification           reward/classifier.py
    armorm         multi-objective custom-code models with .score / .rewards  reward/classifier.py
    pairwise       a causal-LM judge comparing two responses ("A" vs "B")     reward/pairwise.py
    function       a Python function in a file or module of yours            reward/function.py
    combined       a weighted sum of other rewards, optionally z-scored       reward/combined.py
    remote         an HTTP reward server                                      reward/remote.py
`rlhf-loop serve-reward` serves any of them over HTTP (reward/server.py); the loop runs them in a Ray actor
(reward/actor.py). This package imports nothing heavy at import time.
"""
