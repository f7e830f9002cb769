import torch

from defect_ds.model import objective as diffusion
from defect_ds.config import LossConfig

ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


def test_v_target_and_add_noise_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = diffusion.add_noise(x0, eps, t, ALPHAS)
    v = diffusion.prediction_target("v_prediction", x0, eps, t, ALPHAS)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    # x0 is recovered from x_t and v: x0 = sqrt(a) x_t - sqrt(1-a) v
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(diffusion.prediction_target("epsilon", x0, eps, t, ALPHAS), eps)


def test_min_snr_weights():
    t = torch.tensor([0, 999])
    w = diffusion.min_snr_weights(t, ALPHAS, 5.0, "epsilon")
    s = diffusion.snr(t, ALPHAS)
    assert s[0] > 5 and w[0] == 5.0 / s[0]  # high-SNR (low noise) steps are down-weighted
    assert torch.isclose(w[1], torch.tensor(1.0))  # low-SNR steps keep weight 1
    wv = diffusion.min_snr_weights(t, ALPHAS, 5.0, "v_prediction")
    assert torch.allclose(wv, torch.clamp(s, max=5.0) / (s + 1))


def test_noise_offset_adds_a_per_channel_constant():
    lat = torch.zeros(2, 4, 8, 8)
    plain = diffusion.sample_noise(lat, 0.0, torch.Generator().manual_seed(0))
    offset = diffusion.sample_noise(lat, 0.5, torch.Generator().manual_seed(0))
    diff = offset - plain
    assert diff.abs().max() > 0
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff))


def test_small_defect_is_not_drowned_by_background():
    pred, target = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 0, 0] = 1  # a one-pixel scratch
    target[..., 0, 0] = 1.0  # all the error is in the scratch
    cfg = LossConfig(defect_weight=1.0, background_weight=0.1, area_normalised=True)
    loss = diffusion.masked_diffusion_loss(pred, target, mask, cfg)
    assert torch.isclose(loss, torch.tensor(1.0 / 1.1))  # full weight, whatever the area
    plain = diffusion.masked_diffusion_loss(pred, target, mask, LossConfig(area_normalised=False))
    assert plain < 0.01  # the pixel mean would drown it


def test_background_error_weighs_background_weight():
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    target[0, :, :4] = 0  # sample 0: perfect inside its defect, error 1 outside
    cfg = LossConfig(defect_weight=1.0, background_weight=0.25)
    per = diffusion.masked_diffusion_loss(pred[:1], target[:1], mask[:1], cfg)
    assert torch.isclose(per, torch.tensor(0.25 / 1.25))
    # sample 1 has no defect: all background, normalised to its mean error
    assert torch.isclose(diffusion.masked_diffusion_loss(pred[1:], target[1:], mask[1:], cfg), torch.tensor(1.0))
    weights = torch.tensor([2.0, 0.0])
    assert torch.isclose(diffusion.masked_diffusion_loss(pred, target, mask, cfg, weights), per)


def test_latent_mask_stays_binary():
    mask = (torch.rand(1, 1, 64, 64) > 0.7).float()
    small = diffusion.latent_mask(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert set(small.unique().tolist()) <= {0.0, 1.0}


def test_latent_mask_keeps_a_one_pixel_scratch():
    """A scratch thinner than a latent patch still weighs as defect in the loss."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20, 3:40] = 1  # 1 px high, off every 8th row
    small = diffusion.latent_mask(mask, (8, 8))
    assert small[0, 0, 2, :5].all() and small.sum() == 5
