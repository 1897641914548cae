"""Reinforcement learning from rewards: the third stage of the ChatGPT recipe.

  policy.py      tasks ppo and grpo: the policy's model, prompts
  rollout.py     batched rollouts with log-probs (the shared sampler)
  rewards.py     a frozen reward model, or a Python reward function
  advantages.py  KL estimators, GAE, whitening, GRPO groups, adaptive KL
  losses.py      clipped surrogate, clipped value loss, entropy
  learner.py     the jitted prepare (advantages) and update (epochs) programs
  loop.py        the RL loop: iterations, evaluation, checkpoints, resume
"""
