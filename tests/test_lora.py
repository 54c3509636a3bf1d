"""LoRA on the denoiser: reference = adapters off, only LoRA trains, save/load round trip."""

import pytest
import torch

from align.models.lora import adapters_disabled, attach_lora, load_lora, lora_parameters, save_lora
from align.models.tiny_sora import TinySora, TinySoraConfig
from align.objectives import diffusion_dpo_loss, per_sample_mse

SMALL = dict(dim=32, depth=3, heads=2, vae_channels=8, text_dim=32, text_layers=1)


def _model():
    torch.manual_seed(0)
    m = TinySora(TinySoraConfig(**SMALL))
    torch.nn.init.normal_(m.denoiser.out.weight, std=0.05)  # a non-trivial "pretrained" output
    return m.requires_grad_(False)


def _inputs(m, b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *m.latent_shape, generator=g)
    c = m.encode_prompts(["a red square moving left on a black background"] * b)
    return x, torch.full((b,), 500.0), c


def test_fresh_lora_equals_base_and_disabling_restores_base():
    m = _model()
    x, t, c = _inputs(m)
    base_out = m.predict(x, t, c)
    attach_lora(m.denoiser, rank=4, alpha=4)
    assert torch.equal(m.predict(x, t, c), base_out)  # B = 0 at init
    for p in lora_parameters(m.denoiser):
        torch.nn.init.normal_(p, std=0.1)
    assert not torch.allclose(m.predict(x, t, c), base_out)
    with adapters_disabled(m.denoiser):
        assert torch.equal(m.predict(x, t, c), base_out)
    assert not torch.allclose(m.predict(x, t, c), base_out)  # re-enabled afterwards


def test_dpo_steps_change_lora_only():
    m = _model()
    attach_lora(m.denoiser, rank=4, alpha=4, target_modules=["attn.qkv", "attn.proj", "mlp.fc1"])
    before = {n: p.detach().clone() for n, p in m.denoiser.named_parameters()}
    frozen_other = {n: p.detach().clone() for n, p in m.vae.named_parameters()}
    opt = torch.optim.AdamW(lora_parameters(m.denoiser), lr=1e-2)
    x, t, c = _inputs(m, 8)
    w, l = x[:4], x[4:]
    noise = torch.randn_like(w)
    for _ in range(3):
        x0 = torch.cat([w, l])
        n2, t2, c2 = torch.cat([noise, noise]), t, c
        xt = m.scheduler.add_noise(x0, n2, t2)
        target = m.scheduler.target(x0, n2, t2)
        ew, el = per_sample_mse(m.predict(xt, t2, c2), target).chunk(2)
        with torch.no_grad(), adapters_disabled(m.denoiser):
            rw, rl = per_sample_mse(m.predict(xt, t2, c2), target).chunk(2)
        loss = diffusion_dpo_loss(ew, el, rw, rl, beta=100.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in m.denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    for n, p in m.denoiser.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n  # base weights bit-identical
    for n, p in m.vae.named_parameters():
        assert torch.equal(p, frozen_other[n])


def test_save_load_round_trip(tmp_path):
    m = _model()
    attach_lora(m.denoiser, rank=4, alpha=8)
    for p in lora_parameters(m.denoiser):
        torch.nn.init.normal_(p, std=0.1)
    x, t, c = _inputs(m)
    out = m.predict(x, t, c)
    d = save_lora(m.denoiser, tmp_path / "lora")
    assert (d / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    assert all(k.startswith("transformer.") for k in load_file(str(d / "pytorch_lora_weights.safetensors")))
    m2 = _model()
    load_lora(m2.denoiser, d)
    assert torch.allclose(m2.predict(x, t, c), out)


def test_target_matching_nothing_is_named():
    m = _model()
    with pytest.raises(ValueError, match="'to_q' matches no module"):
        attach_lora(m.denoiser, target_modules=["to_q"])


def test_load_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        load_lora(_model().denoiser, tmp_path)
