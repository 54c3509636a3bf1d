"""The tiny Sora model: VAE and U-ViT shapes, skip wiring, VAE learning, save/load."""

import pytest
import torch

from align.models.base import VideoDiffusionModel
from align.models.tiny_sora import TinySora, TinySoraConfig, UViT

SMALL = dict(dim=32, depth=3, heads=2, vae_channels=8, text_dim=32, text_layers=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinySora(TinySoraConfig(**SMALL))


def test_implements_protocol(model):
    assert isinstance(model, VideoDiffusionModel)
    assert model.prediction_type == "flow"


def test_vae_shapes_compress_time_and_space(model):
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    z = model.encode_video(x)
    assert z.shape == (2, 4, 4, 8, 8) == (2, *model.latent_shape)
    assert model.decode_latents(z).shape == x.shape


def test_encode_video_rejects_wrong_shape(model):
    with pytest.raises(ValueError, match="encode_video expects"):
        model.encode_video(torch.zeros(1, 3, 4, 32, 32))


def test_uvit_shapes_and_tokens(model):
    den = model.denoiser
    assert den.num_patches == 4 * 4 * 4
    cond = model.encode_prompts(["a red square moving left on a black background", ""])
    assert cond.shape == (2, 16, 32)
    x = torch.randn(2, *model.latent_shape)
    out = den(x, torch.tensor([10.0, 900.0]), cond)
    assert out.shape == x.shape
    # patchify / unpatchify are inverses
    assert torch.equal(den.unpatchify(den.patchify(x)), x)


def test_uvit_long_skips_are_wired():
    """Every in-block output reaches its out-block: perturbing the skip projection's
    'skip half' changes the output, and the number of skips matches the in-blocks."""
    torch.manual_seed(0)
    cfg = TinySoraConfig(**dict(SMALL, depth=5))
    den = UViT(cfg)
    torch.nn.init.normal_(den.out.weight, std=0.1)
    assert len(den.in_blocks) == len(den.out_blocks) == len(den.skips) == 2
    x, t, c = torch.randn(1, *([4] + list(cfg.latent_size))), torch.tensor([5.0]), torch.randn(1, 16, 32)
    calls = []
    hooks = [s.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1])) for s in den.skips]
    y0 = den(x, t, c)
    for h in hooks:
        h.remove()
    assert calls == [2 * cfg.dim, 2 * cfg.dim]  # each out-block sees [h, skip] concatenated
    with torch.no_grad():
        den.skips[0].weight[:, cfg.dim :] = 0  # cut the outermost long skip
    assert not torch.allclose(den(x, t, c), y0)


def test_time_and_text_change_the_output(model):
    x = torch.randn(1, *model.latent_shape)
    torch.nn.init.normal_(model.denoiser.out.weight, std=0.1)
    c1 = model.encode_prompts(["a red square moving left on a black background"])
    c2 = model.encode_prompts(["a blue circle moving up on a gray background"])
    a = model.predict(x, torch.tensor([100.0]), c1)
    assert not torch.allclose(a, model.predict(x, torch.tensor([800.0]), c1))
    assert not torch.allclose(a, model.predict(x, torch.tensor([100.0]), c2))
    torch.nn.init.zeros_(model.denoiser.out.weight)


def test_vae_reconstruction_improves():
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig(**SMALL))
    x = torch.zeros(4, 3, 8, 32, 32) - 1
    x[:, 0, :, 8:20, 8:20] = 1  # red squares on black
    opt = torch.optim.Adam(m.vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        o = m.vae(x)
        loss = o["rec_loss"] + 1e-4 * o["kl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(o["rec_loss"].item())
    assert losses[-1] < 0.3 * losses[0]


def test_save_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    m2 = TinySora.from_pretrained(tmp_path / "m")
    x = torch.randn(1, *model.latent_shape)
    c = model.encode_prompts(["a red square moving left on a black background"])
    assert torch.equal(model.predict(x, torch.tensor([3.0]), c), m2.predict(x, torch.tensor([3.0]), c))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinySora.from_pretrained(tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="odd"):
        TinySoraConfig(depth=4)
    with pytest.raises(ValueError, match="unknown TinySoraConfig keys"):
        TinySoraConfig.from_dict({"dimm": 3})
