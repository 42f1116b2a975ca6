"""What split-view poisoning costs: buying the expired domains behind a manifest's URLs.

Carlini et al. (2023; seed 001's abstract) report that 0.01% of LAION-400M or COYO-700M could have been
poisoned for $60 (:data:`HEADLINE_2023`). The cost for a given manifest depends on which of its domains
have expired and what they sell for, which only a live lookup can tell; :func:`split_view_cost` takes
those as inputs (domain -> price for the purchasable ones) and returns the cheapest way to control a
target share of the items, buying the domains with the most URLs per dollar first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

from ...errors import ConfigError

HEADLINE_2023 = {"datasets": ("LAION-400M", "COYO-700M"), "poisoned_fraction": 1e-4, "usd": 60.0,
                 "source": "Carlini et al. 2023, abstract (seed 001)"}
"""The paper's headline figure, as its abstract states it (not measured here)."""


def split_view_cost(urls: Sequence[str], purchasable: Mapping[str, float], *, target_fraction: float
                    ) -> dict[str, object]:
    """Cheapest set of purchasable domains (domain -> price) controlling >= ``target_fraction`` of
    ``urls`` (greedy by URLs per dollar); returns the domains, their cost, the share controlled, and
    whether the target is reachable at all."""
    if not urls:
        raise ConfigError("split_view_cost needs at least one url")
    if not 0 < target_fraction <= 1:
        raise ConfigError(f"target_fraction = {target_fraction}; allowed 0 < target_fraction <= 1")
    bad = {d: p for d, p in purchasable.items() if not p >= 0}
    if bad:
        raise ConfigError(f"purchasable prices must be >= 0; got {bad}")
    per_domain = Counter((urlparse(u).hostname or "").lower() for u in urls)
    ranked = sorted((d for d in purchasable if per_domain.get(d.lower(), 0) > 0),
                    key=lambda d: (purchasable[d] / per_domain[d.lower()], d))
    need = target_fraction * len(urls)
    bought: list[str] = []
    cost = covered = 0.0
    for d in ranked:
        if covered >= need:
            break
        bought.append(d)
        cost += purchasable[d]
        covered += per_domain[d.lower()]
    return {"domains": bought, "usd": cost, "controlled_fraction": covered / len(urls),
            "reachable": covered >= need, "max_fraction": sum(per_domain[d.lower()] for d in ranked) / len(urls)}
