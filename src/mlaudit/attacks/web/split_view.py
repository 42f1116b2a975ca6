"""Split-view poisoning (Carlini et al. 2023, sec. 4 of "Poisoning Web-Scale Training Datasets is
Practical"; seed 001): a dataset is distributed as URLs; the maintainer saw one version of each item
when indexing, a client downloads later and may see another. An attacker who re-registers the expired
domains behind a fraction of the URLs serves poisons there. The defence is an integrity hash per item,
taken at indexing time and checked by every client (:mod:`mlaudit.data.manifest`).

:func:`simulate_split_view` plays it end to end on a local :class:`~.server.ContentServer`:

1. the items are served; the maintainer indexes them (:func:`~mlaudit.data.manifest.index_urls`: url,
   sha256, label);
2. time passes: a fraction ``link_rot`` of the items disappears (404), and the attacker takes over a
   fraction ``attacker_fraction`` of the URLs and serves a poison for each;
3. clients download the manifest twice, without and with hash verification, and we count what they got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...data.manifest import FetchReport, ManifestEntry, fetch_all, index_urls
from ...errors import ConfigError
from .server import ContentServer


@dataclass
class SplitViewResult:
    """Counts over the N manifest items. ``controlled`` [N] bool: URLs the attacker served a poison at;
    ``gone`` [N]: items removed (link rot). ``unverified`` / ``verified``: the two clients' reports."""

    manifest: list[ManifestEntry]
    controlled: torch.Tensor
    gone: torch.Tensor
    unverified: FetchReport
    verified: FetchReport

    def poisoned_accepted(self, report: FetchReport) -> int:
        """Items the client kept whose content is not what the maintainer indexed."""
        return sum(s == "accepted" and h != e.sha256
                   for s, h, e in zip(report.status, report.served_sha256, self.manifest))

    def summary(self) -> dict[str, float | int]:
        n = len(self.manifest)
        return {"items": n, "attacker_controlled": int(self.controlled.sum()), "link_rot": int(self.gone.sum()),
                "poisoned_in_training_set_unverified": self.poisoned_accepted(self.unverified),
                "poisoned_in_training_set_verified": self.poisoned_accepted(self.verified),
                "poison_rate_unverified": self.poisoned_accepted(self.unverified) / n,
                "poison_rate_verified": self.poisoned_accepted(self.verified) / n,
                "rejected_verified": self.verified.count("rejected"),
                "unavailable": self.verified.count("unavailable"),
                "clean_accepted_verified": self.verified.count("accepted")}


def simulate_split_view(items: Sequence[bytes], *, attacker_fraction: float, link_rot: float = 0.0,
                        poison: Callable[[int, bytes], bytes] | None = None, labels: Sequence[int] | None = None,
                        eligible: Sequence[bool] | None = None, seed: int = 0) -> SplitViewResult:
    """Index ``items`` (their bytes, e.g. encoded images) on a local server, let the attacker control a
    random ``attacker_fraction`` of the URLs (serving ``poison(i, original)``; default: the original
    with its bytes reversed, any change the hash sees) and ``link_rot`` of the others vanish, then
    download without and with verification. ``eligible`` [N]: the attacker buys only among these URLs
    (the index is public: for a backdoor, the URLs whose label is the target class; the fraction still
    counts over all N items).

    Raises ConfigError for fractions outside [0, 1], no items, ``attacker_fraction + link_rot > 1``, or
    more controlled URLs than eligible ones.
    """
    n = len(items)
    if n == 0:
        raise ConfigError("simulate_split_view needs at least one item")
    for name, v in (("attacker_fraction", attacker_fraction), ("link_rot", link_rot)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} = {v}; allowed 0 <= {name} <= 1")
    if attacker_fraction + link_rot > 1.0:
        raise ConfigError(f"attacker_fraction + link_rot = {attacker_fraction + link_rot}; allowed <= 1 (an item is "
                          "either taken over, gone, or intact)")
    make = poison or (lambda _i, b: bytes(reversed(b)) + b"\x00")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_att, n_rot = round(attacker_fraction * n), round(link_rot * n)
    if eligible is not None:
        ok = torch.as_tensor(list(eligible), dtype=torch.bool)
        if ok.shape != (n,):
            raise ConfigError(f"eligible must hold one bool per item ({n}), got {ok.numel()}")
        if n_att > int(ok.sum()):
            raise ConfigError(f"attacker_fraction = {attacker_fraction} of {n} items is {n_att} URLs, but only "
                              f"{int(ok.sum())} are eligible; allowed attacker_fraction <= {int(ok.sum()) / n:.4g}")
        order = torch.cat([order[ok[order]], order[~ok[order]]])  # eligible URLs first, each group shuffled
    controlled = torch.zeros(n, dtype=torch.bool)
    controlled[order[:n_att]] = True
    gone = torch.zeros(n, dtype=torch.bool)
    gone[order[n_att:n_att + n_rot]] = True
    paths = [f"d{i % 97}/item-{i}.bin" for i in range(n)]  # spread over 97 "domains"
    with ContentServer() as srv:
        urls = [srv.put(p, b) for p, b in zip(paths, items)]
        manifest = index_urls(urls, labels=None if labels is None else list(labels))
        for i, path in enumerate(paths):  # time passes
            if controlled[i]:
                srv.put(path, make(i, items[i]))
            elif gone[i]:
                srv.remove(path)
        unverified = fetch_all(manifest, verify=False)
        verified = fetch_all(manifest, verify=True)
    return SplitViewResult(manifest, controlled, gone, unverified, verified)


def fetched_training_set(report: FetchReport, manifest: Sequence[ManifestEntry],
                         decode: Callable[[bytes], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a client trains on: (x [K, *shape] = ``decode`` of each accepted item's bytes, y [K] int64 = the
    manifest's labels, index [K] = the items' manifest positions). The label is the index's: a split-view
    attacker controls the content behind a URL, not what the index says about it."""
    keep = [i for i, s in enumerate(report.status) if s == "accepted"]
    if not keep:
        raise ConfigError("the client accepted no item: nothing to train on")
    labels = [manifest[i].label for i in keep]
    if any(not isinstance(v, int) for v in labels):
        raise ConfigError("fetched_training_set needs an int label on every accepted manifest entry")
    x = torch.stack([decode(report.content[i]) for i in keep])  # type: ignore[arg-type]  (accepted: bytes)
    return x, torch.tensor(labels, dtype=torch.long), torch.tensor(keep, dtype=torch.long)
