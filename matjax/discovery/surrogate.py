"""The discovery loop's surrogate: a CGCNN ensemble predicting formation energy.

``fit`` trains K members in one program (``matjax.train.loop.fit``), warm-started from the
previous round's ensemble when given (for ``warm_start_epochs``, fewer than a fresh fit
needs); a finished fit leaves ``done.json`` in its workdir,
so a resumed campaign loads the trained ensemble instead of training it again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from matjax.config import CGCNNConfig, TrainConfig
from matjax.data.dataset import Dataset
from matjax.data.graphs import PackedGraphs
from matjax.train.ensemble import EnsemblePredictor, load_predictor
from matjax.train.loop import fit

TARGET = "formation_energy_per_atom"


@dataclasses.dataclass(frozen=True)
class CGCNNSurrogate:
    model_config: CGCNNConfig
    train_config: TrainConfig
    warm_start_epochs: int | None = None  # epochs of a warm-started fit (None: as train_config)
    progress: bool = True

    def __post_init__(self):
        if self.model_config.targets[0] != TARGET:
            raise ValueError(f"the discovery surrogate's first target must be {TARGET!r}, got {self.model_config.targets}")

    def fit(self, train: Dataset, val: Dataset, workdir: Path, warm_start: EnsemblePredictor | None) -> EnsemblePredictor:
        done = Path(workdir) / "done.json"
        if done.exists():
            return load_predictor(workdir)
        train_config = self.train_config
        if warm_start is not None and self.warm_start_epochs is not None:
            epochs = self.warm_start_epochs
            train_config = dataclasses.replace(train_config, max_epochs=epochs, early_stopping=min(epochs, train_config.early_stopping))
        result = fit(self.model_config, train_config, train, val, workdir=workdir, progress=self.progress,
                     init_variables=None if warm_start is None else warm_start.variables)
        best = result.history[result.best_epoch]
        done.write_text(json.dumps({"best_epoch": result.best_epoch, "val_mae": best["val_mae"],
                                    "stop_reason": result.stop_reason, "wall_s": result.wall_s}))
        return EnsemblePredictor(result.model, result.variables, result.scaler, self.model_config.targets)

    def predict(self, state: EnsemblePredictor, graphs: PackedGraphs) -> tuple[np.ndarray, np.ndarray]:
        """(mean [M], std [M]) formation energy per atom over the members."""
        mean, std = state.predict(graphs, batch_size=self.train_config.batch_size)
        return mean[:, 0], std[:, 0]
