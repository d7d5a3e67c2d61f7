"""Image grids during training: what the student makes of one fixed validation batch.

Rows: masked input, reference, teacher (when there is one), student, ground truth; columns: the
5 frames of the first ``samples`` windows. Sent to W&B (``WandbLogger.log_image``) when a W&B
logger is attached, otherwise written as PNG files; without any logger nothing happens. Built
with plain torch ops (torchvision is not a dependency).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import default_collate

__all__ = ["ImageGrid", "image_grid", "window_rows"]

log = logging.getLogger(__name__)

WANDB_KEY = "val/grid"


def image_grid(rows: Sequence[Tensor], padding: int = 2, fill: float = 1.0) -> Tensor:
    """Tile rows of images into one image, ``padding`` pixels of ``fill`` around each.

    Args:
        rows: R tensors (N, C, H, W) of equal shape; row r, image n lands at row r, column n.

    Returns:
        (C, R * (H + padding) + padding, N * (W + padding) + padding).
    """
    stacked = torch.stack(list(rows))  # (R, N, C, H, W)
    rows_n, cols_n, channels, height, width = stacked.shape
    # Pad each image on the right and bottom, tile, then pad the whole grid on the left and top.
    tiles = F.pad(stacked, (0, padding, 0, padding), value=fill)
    grid = tiles.permute(2, 0, 3, 1, 4).reshape(
        channels, rows_n * (height + padding), cols_n * (width + padding))
    return F.pad(grid, (padding, 0, padding, 0), value=fill)


def window_rows(window: Tensor, samples: int) -> Tensor:
    """(B, C, T, H, W) windows to (samples * T, C, H, W) frames, sample by sample."""
    return window[:samples].transpose(1, 2).flatten(0, 1)


class ImageGrid(L.Callback):
    """Every ``every_n_steps`` generator steps, render the fixed batch's grid and log it.

    Args:
        every_n_steps: Steps between grids (``trainer.global_step``).
        output_dir: Folder for PNG files when no W&B logger is attached (default: the trainer's
            ``default_root_dir``/images).
        samples: Windows of the batch to show (5 frames each).
    """

    def __init__(
        self, every_n_steps: int, output_dir: str | None = None, samples: int = 2
    ) -> None:
        for key, value in (("every_n_steps", every_n_steps), ("samples", samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.image_grid.{key} must be an int >= 1, got "
                                 f"{value!r}; set it on the command line")
        self.every_n_steps = every_n_steps
        self.output_dir = Path(output_dir) if output_dir else None
        self.samples = samples
        self._batch: dict[str, Tensor] | None = None
        self._last_step = -1
        self._warned = False

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object,
        batch: object, batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # Gradient accumulation calls this several times per step; one grid per step.
        if not trainer.loggers or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        fixed = self._fixed_batch(trainer)
        if fixed is None:
            return
        rows = self.render(pl_module, fixed)
        grid = image_grid(list(rows.values()))
        self._publish(trainer, grid, step, ", ".join(rows))

    def _fixed_batch(self, trainer: L.Trainer) -> dict[str, Tensor] | None:
        if self._batch is None:
            datamodule = trainer.datamodule
            loader = (datamodule.val_dataloader() if datamodule is not None
                      else trainer.val_dataloaders)
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is None:
                if not self._warned:
                    log.warning("image grid: no validation dataloader yet, so no grid is drawn")
                    self._warned = True
                return None
            # The first samples straight from the dataset: no worker processes are started.
            dataset = loader.dataset
            samples = [dataset[i] for i in range(min(self.samples, len(dataset)))]
            self._batch = {k: v for k, v in default_collate(samples).items()
                           if k in ("face", "mel", "target")}
        return self._batch

    def render(
        self, pl_module: L.LightningModule, batch: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The grid's rows, by name, as (samples * 5, 3, 96, 96) float frames on the CPU."""
        dtype = next(pl_module.student.parameters()).dtype
        mel = batch["mel"].to(pl_module.device, dtype)
        face = batch["face"].to(pl_module.device, dtype)
        was_training = pl_module.training
        # Eval mode: BatchNorm must neither use nor update batch statistics for a picture.
        pl_module.eval()
        try:
            with torch.no_grad():
                student = pl_module.student(mel, face)
                teacher = pl_module.teacher(mel, face) if pl_module.teacher is not None else None
        finally:
            pl_module.train(was_training)
        windows = {"masked input": batch["face"][:, :3], "reference": batch["face"][:, 3:]}
        if teacher is not None:
            windows["teacher"] = teacher
        windows["student"] = student
        windows["ground truth"] = batch["target"]
        return {name: window_rows(w.detach().float().cpu(), self.samples)
                for name, w in windows.items()}

    def _publish(self, trainer: L.Trainer, grid: Tensor, step: int, caption: str) -> None:
        pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)  # BGR
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            rgb = pixels.flip(-1).contiguous().numpy()
            logger.log_image(WANDB_KEY, [rgb], step=step, caption=[f"rows: {caption}"])
        if wandb_loggers:
            return
        folder = self.output_dir or Path(trainer.default_root_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{step:06d}.png"
        if not cv2.imwrite(str(path), pixels.contiguous().numpy()):
            log.warning("image grid: could not write %s", path)
