"""Training helpers: the flow stage's plan and options, and a filter for Lightning's logs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from scvi.train import TrainingPlan

#: Lightning's logger for ``rank_zero_info`` messages, which carries its litlogger tip.
_LIGHTNING_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


class _DropLitloggerTip(logging.Filter):
    """Drop Lightning's advertisement for litlogger; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


@contextlib.contextmanager
def quiet_litlogger_tip() -> Iterator[None]:
    """Silence Lightning's litlogger tip while the block runs.

    Lightning logs it once per ``Trainer``, and ``train()`` builds one trainer per stage,
    so a user would read it three times per call. Only that message is dropped, only from
    Lightning's logger and only inside the block; the filter is removed afterwards.
    """
    logger, tip_filter = logging.getLogger(_LIGHTNING_RANK_ZERO), _DropLitloggerTip()
    logger.addFilter(tip_filter)
    try:
        yield
    finally:
        logger.removeFilter(tip_filter)


class FlowTrainingPlan(TrainingPlan):
    """scvi-tools' training plan with the flow's own metric names.

    Logs ``<metric_name>_train`` and ``<metric_name>_validation`` (the mean squared velocity
    error) instead of ELBO terms, which do not exist for a flow. Optimiser, learning-rate
    schedule and device handling are scvi-tools'.

    Parameters
    ----------
    module
        The flow module.
    metric_name
        Prefix of the logged losses (``"flow_loss"`` for the generative flow,
        ``"perturbation_loss"`` for the perturbation flow).
    **kwargs
        Keyword arguments of :class:`scvi.train.TrainingPlan`.
    """

    def __init__(self, module, *, metric_name: str = "flow_loss", **kwargs):
        super().__init__(module, **kwargs)
        self.metric_name = metric_name

    def _step(self, batch, name: str):
        _, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.log(
            name,
            loss_output.loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=loss_output.n_obs_minibatch,
            sync_dist=self.use_sync_dist,
        )
        return loss_output.loss

    def training_step(self, batch, batch_idx):
        """Run one optimisation step on a batch of latents."""
        return self._step(batch, f"{self.metric_name}_train")

    def validation_step(self, batch, batch_idx):
        """Compute the loss on validation latents with fixed noise and times."""
        self._step(batch, f"{self.metric_name}_validation")


@dataclass
class FlowStageOptions:
    """Training options shared by the flow stages (latent, perturbation, translation flows).

    Built once per stage by :meth:`latentcell.LatentDiffusionModel.train` from its
    arguments; ``batch_size=None`` lets each stage pick its default.
    """

    max_epochs: int | None
    accelerator: str
    devices: int | list[int] | str
    train_size: float
    validation_size: float | None
    batch_size: int | None
    early_stopping: bool
    patience: int | None
    lr: float
    plan_kwargs: dict = field(default_factory=dict)
    trainer_kwargs: dict = field(default_factory=dict)
