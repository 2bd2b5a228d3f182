"""The plan: every output tensor's inputs, method, parameters, shard and offset, decided
from headers alone (build.py) as frozen data (model.py); shards.py splits and names."""

from lazymerge.plan.build import build_plan
from lazymerge.plan.model import (
    COMPUTE,
    COPY_BASE,
    COPY_OTHER,
    Action,
    Input,
    MergePlan,
    PlannedTensor,
    Shard,
)

__all__ = [
    "COMPUTE",
    "COPY_BASE",
    "COPY_OTHER",
    "Action",
    "Input",
    "MergePlan",
    "PlannedTensor",
    "Shard",
    "build_plan",
]
