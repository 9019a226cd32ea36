"""Data parallelism with ``jax.sharding``: one padded sub-batch per device.

A training step sees a *stack* of D padded ``GraphsTuple`` sub-batches (every leaf gets a
leading axis of size D, one per device of a 1-D ``Mesh`` with axis ``"data"``). The step
is ``jax.shard_map``-ped over that axis: each device runs the model on its own sub-batch,
BatchNorm statistics and loss sums are ``psum``-med over ``"data"``, and the gradient of
the replicated parameters is summed across devices by the shard_map transpose. The result
equals one device running all D sub-batches as one batch (``tests/test_sharding.py``
checks the loss curves agree on 4 fake CPU devices).

Parameters and optimiser state are replicated (``PartitionSpec()``); batches are sharded
(``PartitionSpec("data")``). One device is the special case D = 1, so there is a single
code path.

Multi-host (e.g. 4 hosts x 8 GPUs): start the same program on every host and call, before
any other JAX call,

    jax.distributed.initialize()   # coordinator/process ids from the cluster environment
                                   # (SLURM, Open MPI, Cloud TPU) or pass them explicitly:
    # jax.distributed.initialize("host0:1234", num_processes=4, process_id=RANK)

``jax.devices()`` then lists all 32 devices and ``data_mesh()`` spans them. Each host
builds only the sub-batches of its own devices (``jax.local_devices()``) and the global
array is assembled with ``jax.make_array_from_process_local_data`` (see
``put_batches``); the step function is unchanged. Checkpoints are written by orbax from
all hosts to one shared directory.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, NamedTuple

import jax
import jraph
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from matjax.data.batching import Budget, batch_indices, graphs_tuple
from matjax.data.graphs import PackedGraphs, take

AXIS = "data"


def data_mesh(n_devices: int | None = None) -> Mesh:
    """1-D mesh over the first ``n_devices`` devices (None: all), axis ``"data"``."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n_devices} devices, but only {len(devices)} are visible: {devices}")
    return Mesh(np.array(devices[:n]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def stacked(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices."""
    return NamedSharding(mesh, P(AXIS))


def stack_batches(batches: list[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """[D, ...] stack of equally padded GraphsTuples (numpy, host side)."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *batches)


def put_batches(batches: list[jraph.GraphsTuple], mesh: Mesh) -> jraph.GraphsTuple:
    """This process's sub-batches (one per local device, in mesh order) as a global array."""
    local = stack_batches(batches)
    if jax.process_count() == 1:
        return jax.device_put(local, stacked(mesh))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(stacked(mesh), x), local)


def shard_step(fn, mesh: Mesh, out_stacked: bool = False):
    """shard_map ``fn(replicated, local_batch)`` over the mesh.

    fn sees its device's sub-batch without the stack axis. Its outputs are replicated
    (they must be reduced over ``"data"`` inside fn), or, with ``out_stacked``, stacked
    per device along a new leading axis.
    """

    def local(replicated_args, batch):
        out = fn(replicated_args, jax.tree.map(lambda x: x[0], batch))
        return jax.tree.map(lambda x: x[None], out) if out_stacked else out

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS) if out_stacked else P())


class DeviceBatcher:
    """Static-shape, device-sharded batches of one set of graphs.

    Graphs are cut into sub-batches that fit ``budget`` (dynamic batching, nothing
    dropped), D = mesh size consecutive sub-batches form one step, and the last step is
    completed with all-padding sub-batches. ``plan`` returns the graph indices of every
    step ([step][device] -> indices), ``batch`` builds a step's device array.

    targets: optional [M, T] float per-graph targets carried in ``globals["targets"]``.
    """

    def __init__(self, graphs: PackedGraphs, budget: Budget, mesh: Mesh, targets: np.ndarray | None = None):
        self.graphs, self.budget, self.mesh = graphs, budget, mesh
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)

    def plan(self, order=None) -> list[list[np.ndarray]]:
        subs = batch_indices(self.graphs, self.budget, order)
        n_dev = self.mesh.size
        subs += [np.zeros(0, dtype=np.int64)] * (-len(subs) % n_dev)
        return [subs[i : i + n_dev] for i in range(0, len(subs), n_dev)]

    def sub_batch(self, indices: np.ndarray) -> jraph.GraphsTuple:
        """One padded GraphsTuple (numpy) of the graphs ``indices`` (may be empty)."""
        if len(indices) == 0:
            return _all_padding(self.sub_batch(np.zeros(1, dtype=np.int64)), self.budget)
        targets = None if self.targets is None else self.targets[indices]
        return graphs_tuple(take(self.graphs, indices), self.budget, targets)

    def batch(self, step: list[np.ndarray]) -> jraph.GraphsTuple:
        """Device array [D, ...] of one step of ``plan``."""
        return put_batches([self.sub_batch(idx) for idx in step], self.mesh)

    def batches(self, plan: list[list[np.ndarray]], prefetch_size: int = 2):
        """Iterator over the device batches of ``plan``, built ahead on a host thread."""
        return prefetch(map(self.batch, plan), prefetch_size)


def _all_padding(template: jraph.GraphsTuple, budget: Budget) -> jraph.GraphsTuple:
    """A batch shaped like ``template`` whose nodes and edges all belong to the padding graph."""
    zeros = lambda tree: jax.tree.map(np.zeros_like, tree)  # noqa: E731
    n_node = np.zeros_like(template.n_node)
    n_edge = np.zeros_like(template.n_edge)
    n_node[0], n_edge[0] = budget.n_node, budget.n_edge
    return template._replace(
        nodes=zeros(template.nodes), edges=zeros(template.edges), globals=zeros(template.globals),
        senders=np.zeros_like(template.senders), receivers=np.zeros_like(template.receivers),
        n_node=n_node, n_edge=n_edge,
    )


_END = object()


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """Iterate ``items`` while a background thread computes the next ``size`` of them.

    Batch assembly (numpy gathers, host-to-device copies) then overlaps the device step.
    Exceptions in the thread are re-raised here; closing the iterator stops the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_Failure(err))

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


class _Failure(NamedTuple):
    error: BaseException
