"""End-to-end fine-tuning of the VAE and the latent flow together. Tensors only."""

from __future__ import annotations

from scvi.module.base import BaseModuleClass, LossOutput

from latentcell._constants import FLOW_KEYS
from latentcell.module._flow import LatentFlow


class JointModule(BaseModuleClass):
    """The VAE's ELBO plus the flow's loss on the encoder's latent means, in one objective.

    Separately trained, the VAE shapes its latent space for reconstruction alone and the flow
    then models whatever space it got. Fine-tuned jointly, the gradient of the flow loss also
    reaches the encoder, pulling the latent means towards a distribution the flow models
    well, while the ELBO keeps them informative. The flow works in the standardised space
    recorded when it was trained (its ``latent_mean`` / ``latent_std`` stay fixed), so the
    encoder cannot shrink the flow loss by rescaling the latents.

    Parameters
    ----------
    vae
        The stage-1 scvi-tools VAE.
    flow
        The stage-2 latent flow.
    flow_weight
        Weight of the flow loss against the ELBO (both per cell).
    """

    def __init__(self, vae: BaseModuleClass, flow: LatentFlow, flow_weight: float = 1.0):
        super().__init__()
        self.vae = vae
        self.flow = flow
        self.flow_weight = flow_weight

    def _get_inference_input(self, tensors, **kwargs):
        return self.vae._get_inference_input(tensors, **kwargs)

    def _get_generative_input(self, tensors, inference_outputs, **kwargs):
        return self.vae._get_generative_input(tensors, inference_outputs, **kwargs)

    def inference(self, *args, **kwargs):
        """Run the VAE encoder."""
        return self.vae.inference(*args, **kwargs)

    def generative(self, *args, **kwargs):
        """Run the VAE decoder."""
        return self.vae.generative(*args, **kwargs)

    def loss(self, tensors, inference_outputs, generative_outputs, **kwargs) -> LossOutput:
        """ELBO of the VAE plus ``flow_weight`` times the flow loss of the latent means."""
        vae_loss = self.vae.loss(tensors, inference_outputs, generative_outputs, **kwargs)
        z = inference_outputs["qz"].loc
        flow_tensors = {
            FLOW_KEYS.LATENT: z,
            FLOW_KEYS.COND_CAT: tensors[FLOW_KEYS.COND_CAT],
            FLOW_KEYS.COND_CONT: tensors[FLOW_KEYS.COND_CONT],
        }
        flow_inference = self.flow.inference(flow_tensors)
        flow_loss = self.flow.loss(flow_tensors, flow_inference, {}).loss
        extra = dict(vae_loss.extra_metrics or {})
        extra["joint_flow_loss"] = flow_loss.detach()
        return LossOutput(
            loss=vae_loss.loss + self.flow_weight * flow_loss,
            reconstruction_loss=vae_loss.reconstruction_loss,
            kl_local=vae_loss.kl_local,
            extra_metrics=extra,
        )
