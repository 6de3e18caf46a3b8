"""Population-based augmentation search (PBA, Ho et al. 2019) for the teacher or the student role.

* :mod:`rolekd.search.pbt` -- the controller: ranking, exploit/explore, lineages, PBT logs;
* :mod:`rolekd.search.members` -- a member (a trainer + its policy) and the local executor;
* :mod:`rolekd.search.fused` -- the fused executor: all members as one stacked model (``torch.func.vmap``, or
  :mod:`rolekd.search.grouped`'s grouped convolutions);
* :mod:`rolekd.search.ray_executor` -- members (or fused groups of members) as Ray actors;
* :mod:`rolekd.search.run` -- :class:`Search`, one search in a run directory (rounds, logs, resume).

Members' trainers come from a member factory the caller gives (the experiment layer's);
:func:`rolekd.experiment.search_from_config` runs a search from a config.
"""

from .fused import FusedExecutor, StackedWeights
from .members import LocalExecutor, Member, MemberFactory, Outcome, member_config, member_seed
from .pbt import (ZERO_POLICY, Exploit, PBTController, explore, parse_policy_string, policy_string,
                  quantile_size, rank)
from .ray_executor import RayExecutor
from .run import Search, finished_search, search_config

__all__ = ["finished_search", "search_config", "Search", "MemberFactory", "PBTController", "Exploit", "explore", "rank",
           "quantile_size", "policy_string", "parse_policy_string", "ZERO_POLICY", "Member", "LocalExecutor",
           "Outcome", "member_config", "member_seed", "RayExecutor", "FusedExecutor", "StackedWeights"]

