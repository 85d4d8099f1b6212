import math

import pytest
import torch

from latentcell.module import SAMPLER_METHODS, integrate, interpolate, target_velocity


def test_path_closed_form():
    x0 = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    x1 = torch.tensor([[4.0, 2.0], [3.0, 1.0]])
    t = torch.tensor([0.25, 0.5])
    xt = interpolate(x0, x1, t)
    assert torch.allclose(xt, torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert torch.allclose(interpolate(x0, x1, torch.zeros(2)), x0)
    assert torch.allclose(interpolate(x0, x1, torch.ones(2)), x1)
    assert torch.allclose(target_velocity(x0, x1), x1 - x0)


@pytest.mark.parametrize("method", SAMPLER_METHODS)
def test_constant_velocity_is_exact(method):
    x0 = torch.randn(5, 3)
    v = torch.tensor([1.0, -2.0, 0.5])
    out = integrate(lambda x, t: v.expand_as(x), x0, n_steps=3, method=method)
    assert torch.allclose(out, x0 + v, atol=1e-6)


@pytest.mark.parametrize("method", SAMPLER_METHODS)
def test_straight_path_velocity_recovers_data(method):
    # For a single pair, the exact rectified-flow velocity field is x1 - x0 everywhere.
    x0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    out = integrate(lambda x, t: x1 - x0, x0, n_steps=1, method=method)
    assert torch.allclose(out, x1, atol=1e-6)


@pytest.mark.parametrize("method", ["midpoint", "heun"])
def test_time_dependent_field_second_order_exact(method):
    # dx/dt = 2t integrates to x0 + 1 on [0, 1]; second-order schemes are exact for linear-in-t.
    x0 = torch.zeros(2, 1)
    out = integrate(lambda x, t: 2 * t[:, None].expand_as(x), x0, n_steps=4, method=method)
    assert torch.allclose(out, x0 + 1.0, atol=1e-6)


def test_euler_on_time_dependent_field_matches_hand_sum():
    # Euler with 4 steps on dx/dt = 2t: sum of 2 * t_i * 0.25 for t_i = 0, .25, .5, .75 = 0.75
    out = integrate(lambda x, t: 2 * t[:, None].expand_as(x), torch.zeros(1, 1), n_steps=4)
    assert out.item() == pytest.approx(0.75)


def test_exponential_convergence_order():
    x0 = torch.ones(1, 1)
    exact = math.e
    err = {
        m: abs(integrate(lambda x, t: x, x0, n_steps=20, method=m).item() - exact)
        for m in SAMPLER_METHODS
    }
    assert err["heun"] < err["euler"] / 20
    assert err["midpoint"] < err["euler"] / 20


def test_backward_integration_inverts_forward():
    x0 = torch.randn(3, 2)
    field = lambda x, t: torch.stack([x[:, 1], -x[:, 0]], 1) * (1 + t[:, None])
    fwd = integrate(field, x0, n_steps=200, method="heun")
    back = integrate(field, fwd, n_steps=200, method="heun", t0=1.0, t1=0.0)
    assert torch.allclose(back, x0, atol=1e-3)


def test_bad_solver_arguments():
    with pytest.raises(ValueError, match="Unknown method"):
        integrate(lambda x, t: x, torch.zeros(1, 1), method="rk45")
    with pytest.raises(ValueError, match="n_steps"):
        integrate(lambda x, t: x, torch.zeros(1, 1), n_steps=0)


def test_guided_velocity_combines_conditional_and_null_outputs():
    from latentcell.module import guided_velocity

    calls = []

    def net(x, t, c):
        calls.append(x.shape[0])
        return x * 0 + c[:, None] + t[:, None]

    x, t = torch.zeros(3, 2), torch.full((3,), 0.5)
    cond, null = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 1.0])
    # scale 1: the conditional output, one call on the batch itself
    out = guided_velocity(net, x, t, (cond,), (null,), 1.0)
    torch.testing.assert_close(out, torch.full((3, 2), 2.5))
    assert calls == [3]
    # scale w: v_null + w (v_cond - v_null), one call on the doubled batch
    out = guided_velocity(net, x, t, (cond,), (null,), 3.0)
    torch.testing.assert_close(out, torch.full((3, 2), 1.5 + 3.0 * 1.0))
    assert calls == [3, 6]
    out = guided_velocity(net, x, t, (cond,), (null,), 0.0)
    torch.testing.assert_close(out, torch.full((3, 2), 1.5))
