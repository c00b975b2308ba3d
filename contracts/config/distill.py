"""`learner.teacher`: on-policy distillation, a teacher's logprobs of the sampled tokens as a per-token reward."""

from __future__ import annotations

from typing import Annotated

from contracts.config.base import Base, doc


class TeacherConfig(Base):
    path: Annotated[
        str,
        doc(
            "The teacher: a Hugging Face model directory (or hub id), a checkpoint directory (its policy/), a "
            "run directory (its latest whole checkpoint's policy), or a builtin: model. It must share the "
            "policy's tokenizer: it scores the policy's sampled token ids.",
            min_length=1,
        ),
    ]
    coef: Annotated[
        float,
        doc(
            "Weight of the distillation reward −coef·(log π − log π_teacher) on every sampled token: the "
            "per-token reverse KL to the teacher, added to the token rewards beside reward.rules' score.",
            gt=0.0,
        ),
    ] = 1.0
