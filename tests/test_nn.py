import pytest
import torch

from latentcell.nn import ConditionEmbedding, DiTDenoiser, MLPDenoiser, sinusoidal_embedding


def test_time_embedding_separates_early_and_late_times():
    emb = sinusoidal_embedding(torch.tensor([0.1, 0.9, 0.1]), 128)
    assert emb.shape == (3, 128)
    far = torch.linalg.norm(emb[0] - emb[1])
    assert far > 0.5 * torch.linalg.norm(emb[0])
    assert torch.allclose(emb[0], emb[2])
    # without scaling, t in [0, 1] would give almost constant features
    unscaled = sinusoidal_embedding(torch.tensor([0.1, 0.9]), 128, scale=1.0)
    assert torch.linalg.norm(unscaled[0] - unscaled[1]) < far / 2


@pytest.mark.parametrize("cls", [DiTDenoiser, MLPDenoiser])
def test_denoiser_shapes_and_zero_init(cls):
    net = cls(n_latent=10, n_hidden=32, n_layers=2)
    x, t, c = torch.randn(6, 10), torch.rand(6), torch.randn(6, 32)
    out = net(x, t, c)
    assert out.shape == (6, 10)
    # adaLN-Zero: the output layer starts at zero, so the initial velocity is exactly zero
    assert torch.count_nonzero(out) == 0
    out.pow(2).sum().backward()  # gradients still flow into the zero-initialised output layer
    loss = (net(x, t, c) - torch.ones(6, 10)).pow(2).mean()
    loss.backward()
    assert net.final.linear.weight.grad.abs().sum() > 0


def test_dit_pads_latent_into_tokens():
    net = DiTDenoiser(n_latent=10, n_hidden=32, n_layers=1, token_dim=4)
    assert net.n_tokens == 3
    with torch.no_grad():
        net.final.linear.weight.normal_()
    out = net(torch.randn(2, 10), torch.rand(2), torch.zeros(2, 32))
    assert out.shape == (2, 10)


def test_condition_null_tokens_and_drop_mask():
    emb = ConditionEmbedding([3, 2], n_continuous=1, n_hidden=8)
    cat = torch.tensor([[0, 1], [2, 0]])
    cont = torch.tensor([[0.5], [-1.0]])
    null = emb.null_codes(2)
    assert null.tolist() == [[3, 2], [3, 2]]
    all_null = emb(null, torch.full((2, 1), float("nan")))
    dropped = emb(cat, cont, drop=torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(all_null, dropped)
    assert torch.allclose(all_null[0], all_null[1])
    full = emb(cat, cont)
    assert not torch.allclose(full, dropped)
    # dropping only the first attribute equals passing its null code
    part = emb(cat, cont, drop=torch.tensor([[True, False, False]] * 2))
    manual = emb(torch.tensor([[3, 1], [3, 0]]), cont)
    assert torch.allclose(part, manual)
