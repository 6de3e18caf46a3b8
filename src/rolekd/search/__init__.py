"""Population-based augmentation search (PBA, Ho et al. 2019) for the teacher or the student role.

* :mod:`rolekd.search.pbt` -- the controller: ranking, exploit/explore, lineages, PBT logs;
* :mod:`rolekd.search.members` -- a member (a trainer + its policy) and the local executor;
* :mod:`rolekd.search.ray_executor` -- members as Ray actors;
* :mod:`rolekd.search.run` -- :func:`search_from_config`, the ``rolekd search`` command.
"""

from .members import LocalExecutor, Member, NonFiniteLoss, Outcome, member_config, member_seed
from .pbt import (ZERO_POLICY, Exploit, PBTController, explore, parse_policy_string, policy_string,
                  quantile_size, rank)
from .run import Search, search_config, search_from_config

__all__ = ["search_from_config", "search_config", "Search", "PBTController", "Exploit", "explore", "rank",
           "quantile_size", "policy_string", "parse_policy_string", "ZERO_POLICY", "Member", "LocalExecutor",
           "Outcome", "NonFiniteLoss", "member_config", "member_seed", "RayExecutor"]


def __getattr__(name):
    if name == "RayExecutor":
        from .ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(name)
