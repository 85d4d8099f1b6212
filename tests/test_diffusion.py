import math

import pytest
import torch

from latentcell._constants import FLOW_KEYS
from latentcell.module import (
    DIFFUSION_METHODS,
    SAMPLER_METHODS,
    LatentFlow,
    cosine_alpha_bar,
    ddim_sample,
    ddim_step,
    diffuse,
    integrate,
    predict_data,
)
from latentcell.module._diffusion import ALPHA_BAR_EPS, ALPHA_BAR_MAX


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: intra-op threads only add contention on a busy CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# ---------------------------------------------------------------- schedule and DDIM math
def test_cosine_schedule_endpoints_and_monotonicity():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ab = cosine_alpha_bar(t)
    # t = 0 is pure noise, t = 1 is data; both ends are clipped
    assert ab[0].item() == pytest.approx(ALPHA_BAR_EPS)
    assert ab[-1].item() == pytest.approx(ALPHA_BAR_MAX)
    assert ((ab >= ALPHA_BAR_EPS) & (ab <= ALPHA_BAR_MAX)).all()
    assert (ab.diff() >= 0).all()
    inside = (ab > ALPHA_BAR_EPS) & (ab < ALPHA_BAR_MAX)
    assert inside.sum() > 950  # the clipping only bites within ~0.03 of t = 0
    assert (ab[inside].diff() > 0).all()
    # without the lower clip the noise end is exactly cos(pi/2)^2 ~ 0
    raw = cosine_alpha_bar(torch.tensor([0.0, 1.0], dtype=torch.float64), eps=0.0)
    assert raw[1].item() == pytest.approx(ALPHA_BAR_MAX, abs=1e-12)
    assert raw[0].item() == pytest.approx(0.0, abs=1e-12)
    # closed form at t = 0.5 (diffusion time s = 0.5)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    mid = cosine_alpha_bar(torch.tensor([0.5], dtype=torch.float64)).item()
    assert mid == pytest.approx(f(0.5) / f(0.0), rel=1e-12)


def test_diffuse_closed_form():
    x1 = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=torch.float64)
    noise = torch.tensor([[1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    ab = cosine_alpha_bar(t)[:, None]
    assert torch.allclose(diffuse(noise, x1, t), ab.sqrt() * x1 + (1 - ab).sqrt() * noise)
    # near the data end x_t is (almost) the data, near the noise end (almost) the noise
    ones = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(diffuse(noise, x1, ones), x1, atol=1e-2)
    assert torch.allclose(diffuse(noise, x1, 0 * ones), noise, atol=0.1)


def test_ddim_step_hand_computed():
    # alpha_bar = 0.36 (a = 0.6, b = 0.8) -> 0.64 (a = 0.8, b = 0.6)
    x = torch.tensor([[1.0, 0.2]])
    eps_hat = torch.tensor([[0.5, -1.0]])
    ab, ab_next = torch.tensor(0.36), torch.tensor(0.64)
    # x1_hat = (x - 0.8 eps) / 0.6 = [1.0, 5/3]
    assert torch.allclose(predict_data(x, eps_hat, ab), torch.tensor([[1.0, 1.0 / 0.6]]))
    # x_next = 0.8 x1_hat + 0.6 eps = [1.1, 4/3 - 0.6]
    expected = torch.tensor([[1.1, 0.8 / 0.6 - 0.6]])
    assert torch.allclose(ddim_step(x, eps_hat, ab, ab_next), expected)
    # stepping to alpha_bar = 1 returns the predicted data
    final = ddim_step(x, eps_hat, ab, torch.tensor(1.0))
    assert torch.allclose(final, predict_data(x, eps_hat, ab))


def test_ddim_grid_and_callback():
    seen_t, steps = [], []

    def predict_noise(x, t):
        seen_t.append(t.clone())
        return torch.zeros_like(x)

    ddim_sample(predict_noise, torch.randn(3, 2), n_steps=4, callback=steps.append)
    assert steps == [0, 1, 2, 3]
    assert len(seen_t) == 4  # one network evaluation per step
    assert torch.allclose(torch.stack([t[0] for t in seen_t]), torch.tensor([0, 0.25, 0.5, 0.75]))
    with pytest.raises(ValueError, match="n_steps"):
        ddim_sample(predict_noise, torch.randn(3, 2), n_steps=0)


@pytest.mark.parametrize("n_steps", [1, 7])
def test_ddim_with_exact_noise_recovers_a_point_mass(n_steps):
    # For data concentrated at x1, the exact noise prediction is (x - a x1) / b.
    x1 = torch.tensor([[1.5, -2.0]], dtype=torch.float64)

    def predict_noise(x, t):
        ab = cosine_alpha_bar(t)[:, None]
        return (x - ab.sqrt() * x1) / (1 - ab).sqrt()

    out = ddim_sample(predict_noise, torch.randn(5, 2, dtype=torch.float64), n_steps=n_steps)
    assert torch.allclose(out, x1.expand(5, 2), atol=1e-8)


def test_ddim_with_oracle_noise_reaches_gaussian_data():
    # Data N(mu, sigma^2) per coordinate: x_t ~ N(a mu, a^2 sigma^2 + b^2) and the exact
    # noise prediction is E[eps | x_t] = b (x_t - a mu) / (a^2 sigma^2 + b^2).
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def predict_noise(x, t):
        ab = cosine_alpha_bar(t)[:, None]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return b * (x - a * mu) / (a**2 * sigma**2 + b**2)

    torch.manual_seed(0)
    noise = torch.randn(4000, 2, dtype=torch.float64)
    noise = (noise - noise.mean(0)) / noise.std(0)  # exactly standard moments
    out50 = ddim_sample(predict_noise, noise, n_steps=50)
    # The exact probability-flow map of a Gaussian is affine: N(a0 mu, s0^2) at t = 0 goes to
    # N(mu, sigma^2). Starting from N(0, 1) instead (the clip keeps a0 = sqrt(ALPHA_BAR_EPS)
    # of signal at t = 0) shifts the mean by -sigma a0 mu / s0 and scales the std by 1 / s0.
    a0 = math.sqrt(ALPHA_BAR_EPS)
    s0 = torch.sqrt(a0**2 * sigma**2 + 1 - a0**2)
    mean_expected, std_expected = mu - sigma * a0 * mu / s0, sigma / s0
    assert torch.allclose(mean_expected, mu, atol=0.05)  # the clip costs little
    assert torch.allclose(out50.mean(0), mean_expected, atol=0.02)
    assert torch.allclose(out50.std(0), std_expected, rtol=0.05)
    # first-order sampler: more steps are closer
    out200 = ddim_sample(predict_noise, noise, n_steps=200)
    gap50, gap200 = (out50.std(0) - std_expected).abs(), (out200.std(0) - std_expected).abs()
    assert (gap200 < gap50).all()
    assert torch.allclose(out200.std(0), std_expected, rtol=0.01)


# ---------------------------------------------------------------- LatentFlow(objective="ddpm")
def test_ddpm_loss_is_deterministic_with_fixed_noise_and_matches_closed_form():
    flow = _flow(objective="ddpm")
    assert flow.objective == "ddpm"
    batch = _batch()
    _, _, a = flow(batch)
    _, _, b = flow(batch)
    assert torch.equal(a.loss, b.loss)
    # zero-initialised network predicts eps = 0: loss is the mean squared noise
    noise = batch[FLOW_KEYS.NOISE]
    assert torch.allclose(a.loss, (noise**2).mean())
    per_cell = a.reconstruction_loss["reconstruction_loss"]
    assert torch.allclose(per_cell, (noise**2).mean(-1))
    assert per_cell.shape == (5,)
    assert torch.equal(a.extra_metrics["flow_loss"], a.loss.detach())
    # unlike the flow loss, it does not depend on the data (the target is the noise)
    batch[FLOW_KEYS.LATENT] = batch[FLOW_KEYS.LATENT] + 3.0
    assert torch.allclose(flow(batch)[2].loss, a.loss)


def test_ddpm_random_loss_path_and_gradients():
    flow = _flow(objective="ddpm")
    _, _, out = flow(_batch(with_fixed=False))
    out.loss.backward()
    assert flow.denoiser.final.linear.weight.grad is not None


def test_ddpm_sampling_with_guidance_and_unstandardised_output():
    flow = _flow(objective="ddpm")
    z = torch.randn(50, 6) * 3 + 1
    flow.set_scaling(z, torch.rand(50, 1))
    with torch.no_grad():  # make the network depend on x, t and the conditions
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cat, cont = torch.tensor([[1, 0]] * 4), torch.rand(4, 1)
    noise = torch.randn(4, 6)
    steps = []
    plain = flow.sample(cat, cont, n_steps=5, noise=noise, callback=steps.append)
    assert steps == [0, 1, 2, 3, 4]
    assert plain.shape == (4, 6)
    explicit = flow.sample(cat, cont, n_steps=5, method="ddim", noise=noise, cfg_scale=1.0)
    assert torch.allclose(plain, explicit)
    # the output is in the VAE latent space
    cond = flow.scale_continuous(cont)
    by_hand = ddim_sample(lambda x, t: flow.velocity(x, t, cat, cond), noise, n_steps=5)
    assert torch.allclose(plain, flow.unstandardize(by_hand), atol=1e-5)
    # guidance acts on eps as on the velocity: w = 0 is the unconditional model
    uncond = flow.sample(
        flow.condition.null_codes(4), torch.full((4, 1), float("nan")), n_steps=5, noise=noise
    )
    zero_guidance = flow.sample(cat, cont, n_steps=5, noise=noise, cfg_scale=0.0)
    assert torch.allclose(uncond, zero_guidance, rtol=1e-4, atol=1e-4)
    guided = flow.sample(cat, cont, n_steps=5, noise=noise, cfg_scale=2.0)
    assert not torch.allclose(guided, plain)


def test_wrong_methods_and_objective_raise():
    flow, ddpm = _flow(), _flow(objective="ddpm")
    cat, cont = torch.tensor([[1, 0]] * 2), torch.rand(2, 1)
    assert DIFFUSION_METHODS == ("ddim",)
    with pytest.raises(ValueError, match="euler.*midpoint.*heun"):
        flow.sample(cat, cont, n_steps=2, method="ddim")
    for method in SAMPLER_METHODS:
        with pytest.raises(ValueError, match="ddim"):
            ddpm.sample(cat, cont, n_steps=2, method=method)
    with pytest.raises(ValueError, match="objective"):
        _flow(objective="score")


def test_flow_objective_unchanged():
    default, explicit = _flow(), _flow(objective="flow")
    assert default.objective == "flow"
    batch = _batch()
    assert torch.equal(default(batch)[2].loss, explicit(batch)[2].loss)
    x1 = default.standardize(batch[FLOW_KEYS.LATENT])
    expected = ((x1 - batch[FLOW_KEYS.NOISE]) ** 2).mean()
    assert torch.allclose(default(batch)[2].loss, expected)
    with torch.no_grad():
        default.denoiser.final.linear.weight.normal_()
    cat, cont = torch.tensor([[1, 0]] * 3), torch.rand(3, 1)
    noise = torch.randn(3, 6)
    # default method is still Euler and still the plain ODE integration
    plain = default.sample(cat, cont, n_steps=4, noise=noise)
    euler = default.sample(cat, cont, n_steps=4, method="euler", noise=noise)
    assert torch.equal(plain, euler)
    cond = default.scale_continuous(cont)
    by_hand = integrate(lambda x, t: default.velocity(x, t, cat, cond), noise, n_steps=4)
    assert torch.equal(plain, default.unstandardize(by_hand))


# ---------------------------------------------------------------- end to end
def test_ddpm_training_on_two_condition_toy():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 1.0], [2.0, -1.0]])
    n, n_iter = 1024, 600
    c = torch.arange(n) % 2
    z = means[c] + 0.3 * torch.randn(n, 2)
    flow = LatentFlow(2, [2], n_hidden=64, n_layers=2, objective="ddpm")
    flow.set_scaling(z)
    val = {
        FLOW_KEYS.LATENT: z,
        FLOW_KEYS.COND_CAT: c[:, None],
        FLOW_KEYS.NOISE: torch.randn(n, 2),
        FLOW_KEYS.TIME: torch.rand(n),
        FLOW_KEYS.DROP: torch.zeros(n, 1, dtype=torch.bool),
    }
    with torch.no_grad():
        before = flow(val)[2].loss.item()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / n_iter)
    for _ in range(n_iter):
        idx = torch.randint(0, n, (256,))
        _, _, out = flow({FLOW_KEYS.LATENT: z[idx], FLOW_KEYS.COND_CAT: c[idx, None]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    flow.eval()
    with torch.no_grad():
        after = flow(val)[2].loss.item()
    assert after < 0.5 * before
    for k in range(2):
        s = flow.sample(torch.full((400, 1), k), torch.zeros(400, 0), n_steps=50)
        assert torch.allclose(s.median(0).values, means[k], atol=0.4)
        near = ((s - means[k]).norm(dim=1) < 1.0).float().mean().item()
        assert near > 0.75
