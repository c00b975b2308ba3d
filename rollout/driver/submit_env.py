"""What `ray job submit` should carry into the job (`rollout runtime-env` prints it as Ray's
`--runtime-env-json`): the commit the submitter's checkout is at, since `--working-dir` uploads no
`.git`, and the object store's settings from the submitter's environment, so the driver and every
actor reach the run storage the same way."""

from __future__ import annotations

import os

from rollout.archive.manifest import COMMIT_ENV, DIRTY_ENV, git_commit

STORAGE_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def runtime_env(*, credentials: bool) -> dict:
    """{"env_vars": {...}}: the commit, the storage settings set here, and the credentials if asked
    (they are then visible in Ray's job details: on a cluster with its own IAM role, leave them out)."""
    env_vars = {}
    git = git_commit()
    if git is not None:
        env_vars[COMMIT_ENV] = git["commit"]
        env_vars[DIRTY_ENV] = "1" if git["dirty"] else "0"
    for name in STORAGE_ENV + (CREDENTIAL_ENV if credentials else ()):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    return {"env_vars": env_vars}
