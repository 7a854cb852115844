"""train/log.py: log.csv survives a resume without the rows written after the last save;
loss.png draws the curve."""

import numpy as np
from PIL import Image

from train.log import TrainingLog, plot_losses

FIELDS = ("step", "loss", "instance_loss", "prior_loss", "lr", "seconds")

def test_log_drops_rows_after_the_resumed_step_and_plot_draws(tmp_path):
    log = TrainingLog(tmp_path / "log.csv", FIELDS)
    for step in range(1, 6):
        log.append(step=step, loss=1 / step, instance_loss=1, prior_loss=0, lr=1e-3, seconds=0.1)
    resumed = TrainingLog(tmp_path / "log.csv", FIELDS, resume_step=3)
    assert resumed.column("step") == [1, 2, 3]
    resumed.append(step=4, loss=0.2, instance_loss=1, prior_loss=0, lr=1e-3, seconds=0.1)
    assert TrainingLog(tmp_path / "log.csv", FIELDS, resume_step=99).column("step") == [1, 2, 3, 4]
    plot_losses(list(range(50)), [1 / (i + 1) for i in range(49)] + [float("nan")], tmp_path / "loss.png")
    plot = np.asarray(Image.open(tmp_path / "loss.png"))
    assert plot.shape == (400, 640, 3)
    assert ((plot[..., 2] > 150) & (plot[..., 0] < 80)).sum() > 100  # the blue curve is there
