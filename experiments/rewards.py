"""Python reward functions for RL runs (`--config.rl.reward_fn=experiments.rewards:NAME`).

A reward function takes the prompt (its last user turn) and the response
text and returns a float; verifiable rewards (a unit test passed, an answer
matched) are such functions. These are small toy rewards for checking that
PPO and GRPO learn, on any model, in a few iterations.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z']+")


def _words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def letter_a(prompt: str, response: str) -> float:
  """The share of the response's letters that are 'a' (0 for none)."""
  letters = [c for c in response.lower() if c.isalpha()]
  return sum(c == 'a' for c in letters) / len(letters) if letters else 0.0


def repeats_prompt(prompt: str, response: str) -> float:
  """The share of the response's words that the prompt has too (the tiny
  chat of the tests asks "repeat: ...")."""
  asked, said = set(_words(prompt)), _words(response)
  return sum(w in asked for w in said) / len(said) if said else 0.0


def brevity(prompt: str, response: str) -> float:
  """-(words in the response) / 10: shorter is better."""
  return -len(_words(response)) / 10.0
