"""DeepEP's dispatch and combine (``parallelism.a2a: deepep``), priced as vectors.

The messages of a phase are the MoE layer's (source rank, expert device) pairs; DeepEP
moves them as *legs* on the cluster's links:

- ``normal`` (DeepEP's normal kernels: NVLink and RDMA forwarding). Dispatch: a token
  crosses to another node once per destination node, on the source's rail (RDMA leg
  ``rank -> the destination node's GPU with the rank's local index``, its distinct tokens
  for that node), and fans out inside that node over NVLink once per destination GPU
  (NVLink legs ``relay -> expert GPU``, the rank's distinct tokens for that GPU); inside its
  own node a rank sends over NVLink directly. The kernel forwards chunk by chunk, so the
  legs run at once (cut-through): a message arrives when the last of its legs has. Combine
  is the reverse: each expert GPU's partial results go over NVLink to the GPU of its node on
  the rank's rail, which reduces them and sends each token once across nodes (the RDMA leg
  starts when the node's last expert GPU has sent its part).
- ``low_latency`` (DeepEP's low-latency kernels): every (token, expert) straight to the
  expert's GPU: over NVLink inside the node, RDMA (the topology's route) across nodes; the
  combine sends every (token, expert) result back, reduced at the receiver inside the
  kernel (so the rank runs no permute or scatter kernel of its own in this mode:
  :func:`moesim.engine.moe_layer.run_layer`).

Bytes per token are DeepEP's (FP8 dispatch with scales, BF16 combine:
:mod:`moesim.cost.deepep`); neither mode pays the NCCL per-call alpha of the cluster's
profile: a call costs the kernel family's fitted fixed time, and the NIC links deliver the
fitted share of their rate (:class:`moesim.cost.deepep.DeepEPKernel`).

The senders that call :meth:`DeepEPExchange.send` at one simulated instant form one batch;
the legs they start are priced in one pass of :func:`moesim.cost.fluid.batch_finish_s`
(per-link fair sharing, after the links' backlog from earlier batches of the layer's
dispatch and combine), and each receiver gets one event, at its last message's arrival. No
event per flow: a DeepSeek-V3 EP144 decode layer is ~2,600 SimPy events in all (its
compute processes included), against ~106,000 with a relayed per-flow exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import simpy

from moesim.config.model import ModelConfig
from moesim.config.parallelism import DeepEPMode
from moesim.cost.deepep import DeepEPKernel, combine_bytes_per_token, dispatch_bytes_per_token
from moesim.cost.fluid import batch_finish_s
from moesim.engine.netapi import Network
from moesim.layout import Layout
from moesim.routing.route import LayerRouting
from moesim.topology.graph import Topology
from moesim.topology.paths import PathTable, ranges
from moesim.units import GB


@lru_cache(maxsize=8)
def nic_edges(paths: PathTable) -> np.ndarray:
    """Whether each directed edge joins a NIC and a switch (the scale-out links whose rate
    DeepEP's RDMA traffic reaches only in part)."""
    g = paths.topo.graph
    kinds = [{g.nodes[u].get("kind"), g.nodes[v].get("kind")} for u, v in paths.edges]
    return np.array([k == {"nic", "switch"} for k in kinds], dtype=bool)


class Wire:
    """The link capacities DeepEP's kernel sees and the links' backlog, shared by one
    layer's dispatch and combine (a combine starting while dispatch bytes still drain
    queues behind them)."""

    def __init__(self, net: Network, kernel: DeepEPKernel) -> None:
        scale = np.where(nic_edges(net.paths), kernel.rdma_efficiency, 1.0)
        self.capacity = net.paths.bandwidth_gbps * GB * scale
        self.free_s = np.zeros(len(self.capacity))


@dataclass(frozen=True)
class Legs:
    """The transfers of one phase and how they relate to its messages.

    Leg ``j`` moves ``nbytes[j]`` from device ``src[j]`` to ``dst[j]``; it starts once every
    message in its trigger set has been sent (pairs ``trig_msg[i] -> trig_leg[i]``); a
    message arrives when every leg of its arrival set has (pairs ``arr_msg -> arr_leg``)."""

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    trig_msg: np.ndarray
    trig_leg: np.ndarray
    arr_msg: np.ndarray
    arr_leg: np.ndarray


@dataclass(frozen=True)
class Traffic:
    """One layer's messages and the distinct-token counts DeepEP's normal kernels send.

    ``src[i] -> dst[i]`` carries ``slots[i]`` (token, expert) pairs (rank -> expert device)
    of which ``gpu_tokens[i]`` are distinct tokens; ``node_tokens[rank - first, node]`` are
    a rank's distinct tokens with an expert on a node."""

    src: np.ndarray
    dst: np.ndarray
    slots: np.ndarray
    gpu_tokens: np.ndarray
    node_tokens: np.ndarray
    first: int
    node_of: Sequence[int]
    local_of: Sequence[int]
    device_at: dict[tuple[int, int], int]

    def relays(self, nodes: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """The GPU of each ``nodes[i]`` on ``ranks[i]``'s rail (the rank itself where that
        node has no such GPU)."""
        local = np.asarray(self.local_of, dtype=np.int64)
        at = np.full((int(np.max(nodes, initial=0)) + 1, int(local.max()) + 1), -1, np.int64)
        for (n, i), dev in self.device_at.items():
            if n < at.shape[0]:
                at[n, i] = dev
        out = at[nodes, local[ranks]]
        return np.where(out >= 0, out, ranks)


def phase_legs(
    t: Traffic, mode: DeepEPMode, bytes_per_token: float, phase: Literal["dispatch", "combine"]
) -> Legs:
    """The legs of a dispatch (messages ``t.src[i] -> t.dst[i]``) or a combine (the same
    messages back, expert device -> rank), built as arrays.

    Low-latency, or inside a node: one leg per message (slots in low-latency, distinct
    tokens in normal mode). Normal mode across nodes: one RDMA leg per (rank, node), between
    the rank and the node's GPU on its rail, carrying the rank's distinct tokens there,
    shared by the rank's messages to that node (a combine's starts once all of them are
    sent: the relay reduces first), and one NVLink leg per message between that GPU and
    the expert's (none when it is the expert's)."""
    r, e = t.src, t.dst
    m = len(r)
    idx = np.arange(m, dtype=np.int64)
    node = np.asarray(t.node_of, dtype=np.int64)
    tokens = t.slots if mode == "low_latency" else t.gpu_tokens
    if mode == "low_latency":
        direct = r != e
        across = np.zeros(m, dtype=bool)
    else:
        same = node[r] == node[e]
        direct = same & (r != e)
        across = ~same
    forward = phase == "dispatch"
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    legs: list[np.ndarray] = []

    def add(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        first = int(sum(len(x) for x in srcs))
        srcs.append(src)
        dsts.append(dst)
        sizes.append(nbytes.astype(float))
        return np.arange(first, first + len(src), dtype=np.int64)

    d = idx[direct]
    ids = (
        add(r[d], e[d], tokens[d] * bytes_per_token)
        if forward
        else add(e[d], r[d], tokens[d] * bytes_per_token)
    )
    owners.append(d)
    legs.append(ids)
    c = idx[across]
    if len(c):
        nodes_c = node[e[c]]
        relay = t.relays(nodes_c, r[c])
        key = r[c] * (int(node.max()) + 1) + nodes_c
        _, first_of, inv = np.unique(key, return_index=True, return_inverse=True)
        r0, n0, relay0 = r[c][first_of], nodes_c[first_of], relay[first_of]
        nbytes = t.node_tokens[r0 - t.first, n0] * bytes_per_token
        ids = add(r0, relay0, nbytes) if forward else add(relay0, r0, nbytes)
        owners.append(c)
        legs.append(ids[inv.ravel()])
        k = relay != e[c]
        ck = c[k]
        nvl = tokens[ck] * bytes_per_token
        ids = add(relay[k], e[ck], nvl) if forward else add(e[ck], relay[k], nvl)
        owners.append(ck)
        legs.append(ids)
    msg = np.concatenate(owners)
    leg = np.concatenate(legs)
    return Legs(
        np.concatenate(srcs).astype(np.int64),
        np.concatenate(dsts).astype(np.int64),
        np.concatenate(sizes),
        msg,
        leg,
        msg,
        leg,
    )


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` grouped by ``keys`` in ``[0, n)``: (offsets, values in key order)."""
    order = np.argsort(keys, kind="stable")
    return np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n))]), values[order]


def _take(offsets: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The values of every key in ``keys`` (CSR lookup)."""
    start = offsets[keys]
    return values[ranges(start, offsets[keys + 1] - start)]


class DeepEPExchange:
    """One DeepEP phase: senders start their messages' legs, receivers get one event."""

    def __init__(
        self,
        env: simpy.Environment,
        net: Network,
        wire: Wire,
        sender: np.ndarray,
        receiver: np.ndarray,
        legs: Legs,
        latency_s: float,
    ) -> None:
        self.env, self.net, self.wire, self.legs, self.latency_s = env, net, wire, legs, latency_s
        m, n_legs = len(sender), len(legs.src)
        self.sender = np.asarray(sender, dtype=np.int64)
        self.receiver = np.asarray(receiver, dtype=np.int64)
        devices = int(max(self.sender.max(initial=-1), self.receiver.max(initial=-1))) + 1
        self._by_sender = _csr(self.sender, np.arange(m), devices)
        self._by_receiver = _csr(self.receiver, np.arange(m), devices)
        self._trig = _csr(legs.trig_msg, legs.trig_leg, m)
        self._arr_of_leg = _csr(legs.arr_leg, legs.arr_msg, n_legs)
        self._need = np.bincount(legs.trig_leg, minlength=n_legs)
        self._arr_pending = np.bincount(legs.arr_msg, minlength=m)
        flow, self._edge, self._route_latency = net.paths.edge_pairs(legs.src, legs.dst)
        self._hops = np.concatenate([[0], np.cumsum(np.bincount(flow, minlength=n_legs))])
        self.arrived = np.full(m, np.nan)
        """Absolute arrival of each message (NaN until known)."""
        self._leg_arrive = np.full(n_legs, np.nan)
        self._msg_legs_done = np.full(m, -np.inf)
        self._sent_s = np.full(m, np.nan)
        self._recv_pending = np.bincount(self.receiver, minlength=devices)
        self._inbound: dict[int, simpy.Event] = {}
        self._last: dict[int, int] = {}
        self._batch: list[int] = []

    def send(self, src: int) -> None:
        """Start every message of ``src`` now (priced with the others sent at this instant)."""
        if not self._batch:
            self.env.timeout(0).callbacks.append(self._flush)
        self._batch.append(src)

    def _flush(self, _: simpy.Event) -> None:
        senders, self._batch = np.array(self._batch, dtype=np.int64), []
        senders = senders[senders < len(self._by_sender[0]) - 1]
        msgs = _take(*self._by_sender, senders)
        if not len(msgs):
            return
        now = float(self.env.now)
        self._sent_s[msgs] = now
        legs = _take(*self._trig, msgs)
        np.subtract.at(self._need, legs, 1)
        started = np.unique(legs[self._need[legs] == 0])
        touched = msgs
        if len(started):
            self._price(started, now)
            off, of_leg = self._arr_of_leg
            counts = off[started + 1] - off[started]
            done = of_leg[ranges(off[started], counts)]
            np.subtract.at(self._arr_pending, done, 1)
            np.maximum.at(self._msg_legs_done, done, np.repeat(self._leg_arrive[started], counts))
            touched = np.unique(np.concatenate([msgs, done]))
        ready = touched[(self._arr_pending[touched] == 0) & ~np.isnan(self._sent_s[touched])]
        ready = ready[np.isnan(self.arrived[ready])]
        self.arrived[ready] = (
            np.maximum(self._msg_legs_done[ready], self._sent_s[ready]) + self.latency_s
        )
        receivers = self.receiver[ready]
        np.subtract.at(self._recv_pending, receivers, 1)
        complete = np.unique(receivers[self._recv_pending[receivers] == 0])
        if not len(complete):
            return
        # each complete receiver's last arrival, and its first sender (in message order)
        # among the latest
        off, by_receiver = self._by_receiver
        counts = off[complete + 1] - off[complete]
        into = by_receiver[ranges(off[complete], counts)]
        times = self.arrived[into]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        latest = np.maximum.reduceat(times, starts)
        pos = np.where(times == np.repeat(latest, counts), np.arange(len(times)), len(times))
        last = self.sender[into[np.minimum.reduceat(pos, starts)]]
        for d, t, who in zip(complete.tolist(), latest.tolist(), last.tolist()):
            self._last[d] = who
            self.env.timeout(max(0.0, t - now)).callbacks.append(_fire(self.inbound(d)))

    def _price(self, legs: np.ndarray, now: float) -> None:
        """Legs ``legs`` start now: one fluid batch on the wire, bytes on the counters."""
        start = self._hops[legs]
        lengths = self._hops[legs + 1] - start
        edge = self._edge[ranges(start, lengths)]
        flow = np.repeat(np.arange(len(legs)), lengths)
        sizes = self.legs.nbytes[legs]
        times = batch_finish_s(
            now, flow, edge, sizes, self.wire.capacity, self.wire.free_s, inplace=True
        )
        remote = lengths > 0
        self._leg_arrive[legs] = np.where(remote, times.done_s + self._route_latency[legs], now)
        self.net.link_bytes += np.bincount(
            edge, weights=sizes[flow], minlength=len(self.wire.capacity)
        )
        self.net.sent_bytes += float(sizes[remote].sum())
        self.net.events += 1

    def inbound(self, dst: int) -> simpy.Event:
        """An event that fires once every message to ``dst`` has been delivered."""
        ev = self._inbound.get(dst)
        if ev is None:
            ev = self._inbound[dst] = self.env.event()
            waiting = int(self._recv_pending[dst]) if dst < len(self._recv_pending) else 0
            if waiting == 0 and dst not in self._last:
                ev.succeed()  # nothing to wait for
        return ev

    def last_sender(self, dst: int) -> int | None:
        """The sender whose message reached ``dst`` last (the first such in message order);
        None until every message to ``dst`` has been priced, or when it receives nothing."""
        return self._last.get(dst)


def _fire(event: simpy.Event) -> Callable[[simpy.Event], None]:
    def fire(_: simpy.Event) -> None:
        event.succeed()

    return fire


def traffic(
    routing: LayerRouting,
    layout: Layout,
    stage: int,
    topo: Topology,
    src: np.ndarray,
    dst: np.ndarray,
    slots: np.ndarray,
) -> Traffic:
    """The DeepEP view of a layer's dispatch messages (:func:`moesim.engine.moe_layer.
    traffic_arrays`' ``src, dst, slots``): distinct tokens per message and per node from
    the routing's ``rank_tokens`` and ``node_tokens`` (the slots where not counted)."""
    first = layout.device(stage, 0)
    group = layout.ep * layout.etp
    local = src - first
    base = (local // group) * group  # first rank of each rank's edp group
    ep_rank = ((dst - first) - base) // layout.etp
    counted = routing.rank_tokens
    gpu_tokens = counted[local, ep_rank] if counted is not None else slots
    nodes = max(topo.node_of) + 1
    node_tokens = (
        routing.node_tokens
        if routing.node_tokens is not None
        else np.zeros((layout.stage_ranks, nodes), dtype=np.int64)
    )
    return Traffic(
        src,
        dst,
        slots,
        gpu_tokens,
        node_tokens,
        first,
        topo.node_of,
        topo.local_of,
        topo.device_at,
    )


def layer_exchanges(
    env: simpy.Environment,
    net: Network,
    kernel: DeepEPKernel,
    model: ModelConfig,
    t: Traffic,
) -> tuple[DeepEPExchange, DeepEPExchange]:
    """A layer's DeepEP dispatch and combine on one wire (shared link backlog)."""
    wire = Wire(net, kernel)
    mode = kernel.mode
    dispatch = DeepEPExchange(
        env,
        net,
        wire,
        t.src,
        t.dst,
        phase_legs(t, mode, dispatch_bytes_per_token(model.d_model, model.dtype, mode), "dispatch"),
        kernel.dispatch_latency_s,
    )
    combine = DeepEPExchange(
        env,
        net,
        wire,
        t.dst,
        t.src,
        phase_legs(t, mode, combine_bytes_per_token(model.d_model), "combine"),
        kernel.combine_latency_s,
    )
    return dispatch, combine
