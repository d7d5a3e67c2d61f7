"""Distil a slim Wav2Lip student from a frozen teacher, then export it fused and int8.

    python train.py                                  # smoke test on a generated sample
    python train.py data=lrs2 data.root=/data/lrs2_preprocessed teacher.checkpoint=wav2lip.pth
    python train.py --multirun student.slim=0.25,0.5
    python train.py student=nota_like student_init=random   # a preset, from noise
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from data.audio import AudioError
from data.dataset import DataError
from models.checkpoint import CheckpointError, load_weights
from models.discriminator import QualityDiscriminator, load_discriminator
from models.distiller import RecipeError
from models.init import init_from_teacher_
from models.syncnet import SyncNet, load_syncnet
from models.wav2lip import Wav2Lip

log = logging.getLogger(__name__)
# The frozen teacher is in eval mode on purpose; Lightning would warn about it on every fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode", module="lightning")


def build_teacher(checkpoint: str | None, enabled: bool = True) -> Wav2Lip | None:
    """The frozen original generator, from ``checkpoint`` or randomly initialised if None.

    ``enabled=False`` gives no teacher at all: the run trains a generator from scratch.
    """
    if not enabled:
        return None
    if not checkpoint:
        log.warning("teacher.checkpoint is empty: the teacher is RANDOMLY INITIALISED, so this "
                    "run is only a smoke test; set teacher.checkpoint=/path/to/wav2lip.pth")
        return Wav2Lip()
    return load_weights(Wav2Lip(), checkpoint)


def build_syncnet(checkpoint: str | None) -> SyncNet | None:
    """The frozen expert SyncNet from ``checkpoint``; None (no sync term or metrics) if empty."""
    return load_syncnet(checkpoint) if checkpoint else None


def build_discriminator(gan: DictConfig | None) -> QualityDiscriminator | None:
    """The visual-quality discriminator of an enabled ``distill.gan`` stage, else None."""
    if not gan or not gan.get("enabled"):
        return None
    if gan.get("checkpoint"):
        return load_discriminator(gan.checkpoint)
    log.info("distill.gan.checkpoint is empty: the discriminator starts from random weights")
    return QualityDiscriminator()


def describe_student(student: DictConfig) -> str:
    """The student's preset name plus what the command line changed: ``slim50 (slim=0.25)``.

    Reports and checkpoints carry the name, so a preset with overridden widths must not pass
    for the preset itself.
    """
    name = student.get("name") or "custom"
    preset = Path(__file__).parent / "conf" / "student" / f"{name}.yaml"
    if not preset.is_file():
        return name
    original = OmegaConf.load(preset)
    changed = [f"{key}={student[key]}" for key in student
               if key not in ("name", "_target_") and original.get(key) != student[key]]
    return f"{name} ({', '.join(changed)})" if changed else name


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


def close_wandb(loggers: list) -> None:
    """Finish the W&B run, so that the next job of a multirun starts its own."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from ``cfg``, fit, export; returns the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    resume = cfg.get("ckpt_path")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"ckpt_path={resume} is not a file; give a run's "
                          "checkpoints/last.ckpt, or leave ckpt_path unset to start afresh")

    cfg.student.name = describe_student(cfg.student)
    log.info("building teacher and student <%s>", cfg.student.name)
    teacher = build_teacher(cfg.teacher.checkpoint, cfg.teacher.get("enabled", True))
    # _convert_="all": plain lists and dicts, so that checkpoints (hyperparameters, student
    # spec) hold no OmegaConf objects and load with torch.load(weights_only=True) when resumed.
    student = instantiate(cfg.student, _convert_="all")
    if cfg.student_init == "teacher" and teacher is None:
        raise ConfigError("student_init=teacher needs a teacher; use student_init=random with "
                          "teacher=none")
    if cfg.student_init == "teacher":
        init_from_teacher_(student, teacher, cfg.student_importance)
    elif cfg.student_init != "random":
        raise ConfigError(f"student_init={cfg.student_init} is not teacher or random; pick one")

    log.info("checking data <%s>", cfg.data.root)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")

    sync_checkpoint = OmegaConf.select(cfg, "sync.checkpoint")
    log.info("building the loss recipe, SyncNet <%s>", sync_checkpoint)
    syncnet = build_syncnet(sync_checkpoint)
    discriminator = build_discriminator(cfg.distill.get("gan"))
    module = instantiate(cfg.distill, student=student, teacher=teacher, syncnet=syncnet,
                         discriminator=discriminator, _convert_="all")

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    for key, callback in zip(cfg.get("callbacks") or {}, callbacks):
        # Options that name student layers fail now, not after training.
        if hasattr(callback, "check"):
            try:
                callback.check(student)
            except ValueError as err:
                raise ConfigError(f"callbacks.{key}: {err}") from err
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    log.info("distilling for <%s> steps", cfg.trainer.max_steps)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    finally:
        close_wandb(loggers)

    if trainer.is_global_zero:
        for saver in trainer.checkpoint_callbacks:
            label = f"best checkpoint ({saver.monitor})" if saver.monitor else "last checkpoint"
            print(f"{label}: {saver.best_model_path}")
        for callback in callbacks:
            for name, path in getattr(callback, "outputs", {}).items():
                print(f"{name}: {path}")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the checkpoint's monitored metric for sweepers.

    An Optuna-style sweeper must optimise it in the checkpoint's ``mode``: maximise for the
    default ``val/psnr_lower_teacher`` (``hydra.sweeper.direction: maximize``), minimise for a
    loss such as ``val/l1_gt``.
    """
    try:
        metrics = train(cfg)
    except (AudioError, CheckpointError, ConfigError, DataError, RecipeError) as err:
        # Bad input is the user's to fix: one line, no traceback.
        fail(str(err))
    except MissingMandatoryValue as err:
        fail(f"{err.full_key} has no value; set it on the command line ({err.full_key}=...)")
    except InstantiationException as err:
        fail(f"cannot build {_config_key(err)}: {_first_line(err.__cause__ or err)}")
    return metrics.get(OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor"))


def fail(message: str) -> NoReturn:
    """Exit with ``message`` as a one-line error, leaving no run folder that holds nothing else."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    bookkeeping = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= bookkeeping:
        logging.shutdown()  # closes the log file before its folder goes
        shutil.rmtree(run_dir)
    else:
        # The console gets the message once, from sys.exit; the run's log file keeps it too.
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    sys.exit(f"error: {message}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _config_key(err: InstantiationException) -> str:
    # Hydra ends its message with "full_key: <group>" naming the config node it was building.
    keys = [line.split(":", 1)[1].strip() for line in str(err).splitlines()
            if line.startswith("full_key:")]
    return f"<{keys[-1]}>" if keys else "the config"


if __name__ == "__main__":
    main()
