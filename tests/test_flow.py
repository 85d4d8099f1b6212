import torch

from latentcell._constants import FLOW_KEYS
from latentcell.module import LatentFlow


def _flow(**kw):
    torch.manual_seed(0)
    return LatentFlow(
        n_latent=6,
        n_cats_per_attr=[3, 2],
        n_continuous=1,
        n_hidden=16,
        n_layers=1,
        token_dim=3,
        **kw,
    )


def test_condition_dropout_mask_rates():
    flow = _flow(p_uncond=0.2, p_drop_attr=0.1)
    torch.manual_seed(1)
    mask = flow.condition_dropout_mask(20000, torch.device("cpu"))
    assert mask.shape == (20000, 3)
    whole = mask.all(1).float().mean().item()
    assert abs(whole - (0.2 + 0.8 * 0.1**3)) < 0.015
    per_attr = mask.float().mean(0)
    assert torch.allclose(per_attr, torch.full((3,), 0.2 + 0.8 * 0.1), atol=0.015)
    none = LatentFlow(
        6, [3], p_uncond=0.0, p_drop_attr=0.0, n_hidden=16, n_layers=1, token_dim=3
    ).condition_dropout_mask(100, torch.device("cpu"))
    assert not none.any()


def _batch(n=5, with_fixed=True):
    tensors = {
        FLOW_KEYS.LATENT: torch.randn(n, 6),
        FLOW_KEYS.COND_CAT: torch.tensor([[0, 1]] * n),
        FLOW_KEYS.COND_CONT: torch.rand(n, 1),
    }
    if with_fixed:
        tensors[FLOW_KEYS.NOISE] = torch.randn(n, 6)
        tensors[FLOW_KEYS.TIME] = torch.rand(n)
        tensors[FLOW_KEYS.DROP] = torch.zeros(n, 3, dtype=torch.bool)
    return tensors


def test_loss_is_deterministic_with_fixed_noise_and_matches_closed_form():
    flow = _flow()
    batch = _batch()
    _, _, a = flow(batch)
    _, _, b = flow(batch)
    assert torch.equal(a.loss, b.loss)
    # zero-initialised network predicts v = 0: loss is the mean squared target velocity
    x1 = flow.standardize(batch[FLOW_KEYS.LATENT])
    expected = ((x1 - batch[FLOW_KEYS.NOISE]) ** 2).mean()
    assert torch.allclose(a.loss, expected)


def test_random_loss_path_and_gradients():
    flow = _flow()
    _, _, out = flow(_batch(with_fixed=False))
    out.loss.backward()
    assert flow.denoiser.final.linear.weight.grad is not None


def test_scaling_round_trip_and_sampling_with_guidance():
    flow = _flow()
    z = torch.randn(50, 6) * 3 + 1
    flow.set_scaling(z, torch.rand(50, 1))
    assert torch.allclose(flow.unstandardize(flow.standardize(z)), z, atol=1e-5)
    with torch.no_grad():
        flow.denoiser.final.linear.weight.normal_()
    cat, cont = torch.tensor([[1, 0]] * 4), torch.rand(4, 1)
    noise = torch.randn(4, 6)
    plain = flow.sample(cat, cont, n_steps=5, noise=noise)
    guided_one = flow.sample(cat, cont, n_steps=5, noise=noise, cfg_scale=1.0)
    assert torch.allclose(plain, guided_one)
    uncond = flow.sample(
        flow.condition.null_codes(4), torch.full((4, 1), float("nan")), n_steps=5, noise=noise
    )
    zero_guidance = flow.sample(cat, cont, n_steps=5, noise=noise, cfg_scale=0.0)
    assert torch.allclose(uncond, zero_guidance, atol=1e-5)
    assert plain.shape == (4, 6)
