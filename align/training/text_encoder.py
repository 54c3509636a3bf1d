"""Whether a DPO run loads its model's text encoder: the decision, made before the model is loaded.

A diffusers pipeline's text encoder can be large (UMT5-XXL alone is ~11 GB in bf16). With
``latent_cache_dir``, a run whose cache already holds the states of every prompt of its
dataset (and of ``""``), keyed by the text encoder's files (:mod:`align.data.latent_cache`),
loads the model without it. Otherwise the encoder is loaded and the run fills the cache, unless
the recipe says ``model_options: {load_text_encoder: false}``: then a missing prompt is a
``ValueError`` naming it and the ``vidalign data cache`` command that fills the cache.
``load_text_encoder: true`` always loads it. TinySora (small) always keeps its text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.data.latent_cache import cache_command, cached_prompt_states, missing_prompts_message, text_identity
from align.data.preference import load_preference_dataset
from align.models import is_diffusers_source


def prompt_coverage(source: str, options: dict, cache_dir, prompts: list[str], device) -> tuple[list[str], Path | None]:
    """``(prompts missing, unconditional.safetensors or None)`` of the prompt namespace that a
    diffusers pipeline at ``source`` loaded with ``options`` on ``device`` would use in
    ``cache_dir``, found by its text-encoder files without loading the model (no such
    namespace: every prompt is missing)."""
    from align.models.diffusers import family_of, model_class, read_pipeline_class  # diffusers: only for its models
    from align.models.diffusers.loading import resolve_dtype

    cls = model_class(options.get("family") or family_of(read_pipeline_class(source), source), source)
    dtype = resolve_dtype(options.get("dtype", "auto"), torch.device(device))
    return cached_prompt_states(text_identity(source, cls, dtype, options, cache_dir), cache_dir, prompts)


def text_encoder_options(cfg, device, dataset=None) -> dict:
    """Extra ``load_model`` options for a DPO run: with ``latent_cache_dir`` on a diffusers
    pipeline whose cache holds the states of every prompt of ``dataset`` (the loaded
    ``cfg.dataset``; read here when not given) and of ``""``, ``{"load_text_encoder": False,
    "prompt_embeds": <unconditional.safetensors>}``: the text encoder is not loaded. Otherwise
    ``{}``: it is loaded and the run fills the cache, except with ``model_options.load_text_encoder:
    false``, where a missing prompt is a ValueError naming it and the command that fills the
    cache (``load_text_encoder: true`` always loads it)."""
    options = dict(cfg.model_options)
    choice = options.pop("load_text_encoder", None)
    table = options.pop("prompt_embeds", None)
    if not cfg.latent_cache_dir or choice is True or not is_diffusers_source(cfg.model):
        return {}
    dataset = load_preference_dataset(cfg.dataset) if dataset is None else dataset
    prompts = [*dict.fromkeys(str(p) for p in dataset["prompt"]), ""]
    command = cache_command(cfg.dataset, cfg.model, cfg.latent_cache_dir, options, device)
    try:
        missing, uncond = prompt_coverage(cfg.model, options, cfg.latent_cache_dir, prompts, device)
    except ValueError as e:
        if choice is False:
            raise
        print(f"[vidalign] latent cache: loading the text encoder ({e})")
        return {}
    if not missing:
        print(f"[vidalign] latent cache: all {len(prompts)} prompt states cached; the text encoder is not loaded")
        return {"load_text_encoder": False, "prompt_embeds": table or str(uncond)}
    if choice is False:
        raise ValueError(missing_prompts_message(missing, cfg.latent_cache_dir, command))
    print(
        f"[vidalign] latent cache: {len(missing)} of {len(prompts)} prompt(s) not cached; the text encoder is "
        f"loaded to encode them (to train without it, fill the cache first: `{command}`)"
    )
    return {}
