"""Multi-turn episodes: the environments a rollout plays against (`env.name`), by name or a user's class.

`registry` finds them (and checks `env` at start-up); `calculator` and `conversation` are the
built-ins. The runner in `rollout.generation` plays them; this package imports only the contracts and
`reward/` (the rule functions the conversation scores turns with).
"""
