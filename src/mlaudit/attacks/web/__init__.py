"""Web-scale dataset poisoning (Carlini et al. 2023, "Poisoning Web-Scale Training Datasets is
Practical", seed 001): split-view poisoning of URL-indexed datasets and frontrunning of snapshots of
crowd-sourced content, simulated end to end with a local HTTP server, and the defences (integrity
hashes checked by every client, :mod:`mlaudit.data.manifest`; a trust delay before a snapshot).

* :mod:`.server`: :class:`ContentServer`, a 127.0.0.1 HTTP server whose content the attacker can change.
* :mod:`.split_view`: :func:`simulate_split_view` -- index, let some domains expire and be bought,
  download with and without hash checks; :func:`fetched_training_set` -- what each client trains on.
* :mod:`.frontrunning`: :func:`simulate_frontrunning` -- malicious edits timed before a snapshot,
  reverted after a random delay, with and without the trust-delay and random-order defences.
* :mod:`.cost`: :func:`split_view_cost` -- what buying the expired domains of a manifest costs.
"""

from .cost import HEADLINE_2023, split_view_cost
from .frontrunning import FrontrunResult, simulate_frontrunning
from .server import ContentServer
from .split_view import SplitViewResult, fetched_training_set, simulate_split_view

__all__ = ["HEADLINE_2023", "ContentServer", "FrontrunResult", "SplitViewResult", "simulate_frontrunning",
           "fetched_training_set", "simulate_split_view", "split_view_cost"]
