"""`flora simulate`: a grid of recipes x data splits x strategies x objectives x seeds, each cell a real run.

experiment  the grid's settings (TOML) and its cells
data        the dataset of a cell: train/validation/test, and the clients' split
fleet       N virtual edge clients in one process, sharing one frozen base (only adapters differ)
cell        one cell: the real coordinator and the real edge agents over the in-memory broker
grid        the resumable loop over cells, with a progress view
report      results.csv / results.json, the markdown table, accuracy-per-round plots
"""

from flora.app.simulate.experiment import Cell, ExperimentConfig, load_experiment
from flora.app.simulate.grid import run_grid

__all__ = ["Cell", "ExperimentConfig", "load_experiment", "run_grid"]
