"""The Ray names of a cluster's named actors, in one place that imports nothing: every
layer finds actors by these names, so none needs to import another's module to learn
one."""

from __future__ import annotations

PROCESSOR_NAME = "flowray-processor"
RESTARTER_NAME = "flowray-restarter"
GATEWAY_NAME = "flowray-gateway"


def actor_name(group: int, replica: int) -> str:
    """The Ray actor name of replica ``replica`` of group ``group``."""
    return f"flowray-g{group:03d}-r{replica}"


def gateway_name(index: int) -> str:
    """The Ray actor name of gateway ``index`` (the first keeps the historical name)."""
    return GATEWAY_NAME if index == 0 else f"{GATEWAY_NAME}-{index}"
