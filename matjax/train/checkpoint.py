"""Checkpoints with orbax: a pytree plus a JSON record, under "latest" and "best".

A run directory holds two orbax ``CheckpointManager``s, each keeping one checkpoint:

    <dir>/latest/<step>/   the full training state, written every ``checkpoint_every``
                           steps and at each epoch end, to resume a killed run;
    <dir>/best/<epoch>/    the model variables of the best validation epoch, for
                           prediction (``load_predictor`` in ``matjax.train.ensemble``).

Each checkpoint stores a JSON record with the configs it was made with. Restoring
compares them with the caller's and raises ``CheckpointMismatchError`` naming every
differing field, rather than orbax's shape error deep inside a tree. Arrays are restored
into an abstract target (``jax.eval_shape`` of the initialiser), so dtypes, shapes and
shardings come from the code, not from the files. Writes are asynchronous and atomic
(orbax renames a finished temporary directory), so a run killed while saving still has
its previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint was written with a different configuration."""


def config_to_dict(config) -> dict:
    """JSON-ready dict of a (nested) frozen config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, values: dict):
    """Inverse of ``config_to_dict``: nested dataclasses rebuilt, lists back to tuples."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        if dataclasses.is_dataclass(field.default):
            value = config_from_dict(type(field.default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'name: saved -> current' for every leaf field that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Checkpointer:
    """"latest" and "best" orbax checkpoints of one run, tagged with its configs.

    configs: JSON-ready dict (e.g. {"model": ..., "train": ...}) that a checkpoint must
    match to be restored; ``compare`` lists the keys checked for the restore (the
    prediction side needs only the model config to match). upgrade: maps the configs a
    checkpoint was saved with to today's fields before they are compared (e.g. a field added
    since then, whose default keeps the old behaviour, set to that default).
    """

    def __init__(self, directory: str | Path, configs: dict, upgrade: Callable[[dict], dict] | None = None):
        self.directory = Path(directory).absolute()
        self.configs = configs
        self.upgrade = upgrade or (lambda saved: saved)
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._managers = {
            kind: ocp.CheckpointManager(self.directory / kind, options=options) for kind in ("latest", "best")
        }

    def save(self, kind: str, step: int, tree: Any, record: dict) -> None:
        """Write ``tree`` (arrays) and ``record`` (JSON) as checkpoint ``step`` of ``kind``."""
        record = {**record, "configs": self.configs}
        self._managers[kind].save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), record=ocp.args.JsonSave(record)), force=True
        )

    def latest_step(self, kind: str) -> int | None:
        return self._managers[kind].latest_step()

    def record(self, kind: str) -> dict | None:
        """The JSON record of the newest ``kind`` checkpoint, None if there is none."""
        step = self.latest_step(kind)
        if step is None:
            return None
        return self._managers[kind].restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

    def restore(self, kind: str, abstract_tree: Any, compare: tuple[str, ...] | None = None) -> tuple[Any, dict] | None:
        """(tree, record) of the newest ``kind`` checkpoint, None if there is none.

        Raises CheckpointMismatchError if its configs differ from this run's (in the keys
        ``compare``, default all).
        """
        record = self.record(kind)
        if record is None:
            return None
        step = self.latest_step(kind)
        path = self.directory / kind / str(step)
        keys = tuple(self.configs) if compare is None else compare
        upgraded = self.upgrade(record["configs"])
        saved = {k: upgraded.get(k) for k in keys}
        diffs = config_differences(saved, {k: self.configs[k] for k in keys})
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written with a different configuration: " + "; ".join(diffs)
                + ". Use a new run directory or the original configuration."
            )
        restored = self._managers[kind].restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree), record=ocp.args.JsonRestore())
        )
        return restored.state, restored.record

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any, sharding=None) -> Any:
    """ShapeDtypeStructs of ``tree`` (optionally placed with ``sharding``) to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_best(workdir: str | Path, abstract_for: Callable[[dict], Any], what: str = "model") -> tuple[Any, dict]:
    """(variables, saved configs) of the best-validation checkpoint of a training run;
    ``abstract_for(configs)`` gives the variables' shapes, which depend on the saved configs."""
    with Checkpointer(workdir, {}) as ckpt:
        record = ckpt.record("best")
        if record is None:
            raise FileNotFoundError(f"no 'best' {what} checkpoint under {Path(workdir).absolute()}")
        variables, _ = ckpt.restore("best", abstract_like(abstract_for(record["configs"])), compare=())
    return variables, record["configs"]
