"""Redundant experts placed by DeepSeek's Expert Parallelism Load Balancer (EPLB).

The published algorithm (github.com/deepseek-ai/EPLB, ``eplb.py``; the DeepSeek-V3 report,
section 3.4, "redundant experts"), re-implemented in numpy, per MoE layer, from a load
estimate of each logical expert (configured popularity or observed counts):

- **replicate**: the ``slots - experts`` redundant slots go one at a time to the expert
  with the highest load per replica (``load / replicas``);
- **pack**: items are packed greedily, heaviest first, onto the pack with the least load
  that still has room, every pack taking the same number of items (balanced packing);
- **hierarchical** (used when the expert groups divide evenly over the nodes, as in
  DeepSeek's prefill): pack the expert groups onto nodes, replicate inside each node,
  then pack each node's replicas onto its GPUs: a group's experts stay on one node, so
  group-limited routing keeps its node limit;
- **global** (otherwise, as in decode): replicate over all slots, then pack onto GPUs.

Each GPU holds ``slots / gpus`` consecutive slots. A token choosing an expert with ``r``
replicas is sent to one of them; the choices of a batch are spread evenly (the ``j``-th
choice of expert ``e`` in the batch goes to replica ``j mod r``), which is what the
serving engines' dynamic dispatch approaches over a batch (SGLang's and vLLM's EPLB
pick a replica per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Policy = Literal["auto", "hierarchical", "global"]


def balanced_packing(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the ``n`` items of each row of ``weight`` (rows x n) onto ``packs`` packs of
    ``n / packs`` items each, heaviest first onto the lightest pack with room.
    Returns (pack of each item, its rank inside the pack), both int64 (rows x n)."""
    rows, n = weight.shape
    per_pack = n // packs
    if per_pack * packs != n:
        raise ValueError(f"{n} items do not fill {packs} packs evenly")
    if per_pack == 1:
        index = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy()
        return index, np.zeros((rows, n), dtype=np.int64)
    pack = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    for i in range(rows):
        load = np.zeros(packs)
        items = np.zeros(packs, dtype=np.int64)
        for g in order[i]:
            room = np.where(items < per_pack, load, np.inf)
            p = int(np.argmin(room))
            pack[i, g] = p
            rank[i, g] = items[p]
            load[p] += weight[i, g]
            items[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill ``slots`` physical slots with the ``n`` logical experts of each row (rows x n):
    one each, then every redundant slot to the expert of largest load per replica.
    Returns (logical expert of each slot, its replica index, replicas of each expert)."""
    rows, n = weight.shape
    phy2log = np.broadcast_to(np.arange(slots, dtype=np.int64) % max(n, 1), (rows, slots)).copy()
    replica = np.zeros((rows, slots), dtype=np.int64)
    count = np.ones((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for i in range(n, slots):
        hot = np.argmax(weight / count, axis=1)
        phy2log[:, i] = hot
        replica[:, i] = count[r, hot]
        count[r, hot] += 1
    return phy2log, replica, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def hierarchical(
    weight: np.ndarray, slots: int, groups: int, nodes: int, gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy (``rebalance_experts_hierarchical``); ``groups = nodes =
    1`` is its global policy. ``weight`` is (layers x experts). Returns (logical expert of
    each slot, its replica index, replicas of each expert), slot ``s`` on GPU
    ``s // (slots / gpus)``."""
    layers, experts = weight.shape
    group_size = experts // groups
    per_node = groups // nodes
    per_gpu = slots // gpus
    # 1: expert groups onto nodes
    group_load = weight.reshape(layers, groups, group_size).sum(axis=2)
    gpack, grank = balanced_packing(group_load, nodes)
    log2mlog = (
        ((gpack * per_node + grank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(layers, experts)
    mlog2log = _inverse(log2mlog)
    # 2: replicas inside each node
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts // nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, slots // nodes)
    # 3: each node's replicas onto its GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, gpus // nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    offset = np.arange(0, experts, experts // nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, nodes, -1) + offset).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def chosen_policy(policy: Policy, groups: int, nodes: int) -> Literal["hierarchical", "global"]:
    """EPLB's rule for ``auto``: hierarchical when the expert groups divide over the nodes."""
    if policy != "auto":
        return policy
    return "hierarchical" if groups % nodes == 0 else "global"


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert fills each physical slot, per MoE layer."""

    phy2log: np.ndarray
    """int64 (layers x slots): the logical expert in each slot."""
    replica: np.ndarray
    """int64 (layers x slots): which replica of its expert a slot is."""
    count: np.ndarray
    """int64 (layers x experts): replicas of each logical expert."""
    gpus: int
    """EP ranks the slots are spread over (``slots / gpus`` consecutive slots each)."""
    policy: Literal["hierarchical", "global"]

    @property
    def slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def log2phy(self) -> np.ndarray:
        """int64 (layers x experts x max replicas): each expert's slots, -1 padded."""
        layers, experts = self.count.shape
        out = np.full((layers, experts, int(self.count.max())), -1, dtype=np.int64)
        lay = np.broadcast_to(np.arange(layers)[:, None], self.phy2log.shape)
        slot = np.broadcast_to(np.arange(self.slots), self.phy2log.shape)
        out[lay, self.phy2log, self.replica] = slot
        return out

    def gpu_load(self, load: np.ndarray) -> np.ndarray:
        """Expected load per GPU (layers x gpus) for expert loads ``load`` (layers x
        experts), each expert's load split evenly over its replicas."""
        layers = self.phy2log.shape[0]
        per_slot = np.take_along_axis(load / self.count, self.phy2log, axis=1)
        return per_slot.reshape(layers, self.gpus, -1).sum(axis=2)

    def physical(self, layer: int, ranking: np.ndarray, top_k: int) -> np.ndarray:
        """Each token's choices (tokens x depth, logical ids) as slots of ``layer``: the
        ``j``-th top-k choice of an expert in the batch goes to its replica ``j mod r``;
        reroute candidates beyond top-k to replica ``token mod r``."""
        table = self.log2phy[layer]
        count = self.count[layer]
        ranking = ranking.astype(np.int64)
        out = np.empty_like(ranking)
        top = ranking[:, :top_k].ravel()
        order = np.argsort(top, kind="stable")
        sorted_e = top[order]
        first = np.searchsorted(sorted_e, sorted_e, side="left")
        within = np.empty_like(top)
        within[order] = np.arange(top.size) - first
        out[:, :top_k] = table[top, within % count[top]].reshape(-1, top_k)
        if ranking.shape[1] > top_k:
            rest = ranking[:, top_k:]
            tok = np.arange(ranking.shape[0])[:, None]
            out[:, top_k:] = table[rest, tok % count[rest]]
        return out


def rebalance(
    load: np.ndarray, slots: int, groups: int, nodes: int, gpus: int, policy: Policy = "auto"
) -> ExpertPlacement:
    """EPLB's ``rebalance_experts`` on ``load`` (layers x experts): ``slots`` physical
    slots over ``gpus`` GPUs on ``nodes`` nodes, experts in ``groups`` groups."""
    experts = load.shape[1]
    which = chosen_policy(policy, groups, nodes)
    problems = []
    if slots < experts or slots % gpus:
        problems.append(f"{slots} slots must be >= {experts} experts and a multiple of {gpus}")
    if which == "hierarchical" and (
        experts % groups or groups % nodes or gpus % nodes or slots % nodes
    ):
        problems.append(
            f"hierarchical needs groups ({groups}) | experts ({experts}), nodes ({nodes}) | "
            f"groups, and nodes | gpus ({gpus}) and slots ({slots})"
        )
    if problems:
        raise ValueError("; ".join(problems))
    weight = np.asarray(load, dtype=float)
    if which == "hierarchical":
        phy2log, rank, count = hierarchical(weight, slots, groups, nodes, gpus)
    else:
        phy2log, rank, count = hierarchical(weight, slots, 1, 1, gpus)
    return ExpertPlacement(phy2log, rank, count, gpus, which)


def unbalanced_gpu_load(load: np.ndarray, gpus: int) -> np.ndarray:
    """Per-GPU load (layers x gpus) without a balancer: the experts in id order,
    ``ceil(experts / gpus)`` consecutive ones per GPU, no replicas."""
    layers, experts = load.shape
    per = -(-experts // gpus)
    owner = np.arange(experts) // per
    out = np.zeros((layers, gpus))
    for g in range(gpus):
        out[:, g] = load[:, owner == g].sum(axis=1)
    return out


def max_mean(gpu_load: np.ndarray) -> float:
    """Mean over layers of max / mean GPU load (1 = perfectly balanced)."""
    mean = gpu_load.mean(axis=1)
    ok = mean > 0
    return float(np.mean(gpu_load.max(axis=1)[ok] / mean[ok])) if ok.any() else 1.0
