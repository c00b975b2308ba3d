"""Environments: what an episode's model turns are answered by (`env.name`), built-in or a user's class.

`registry` finds them (and checks `env` at start-up); `calculator` and `conversation` are the built-ins.
The episode runner in `rollout.generation.episodes` plays them. This package imports the contracts, and
the reward rules' registry (`reward.rules.RULES`) through which the conversation scores its turns.
"""
