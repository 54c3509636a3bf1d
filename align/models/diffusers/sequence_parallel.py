"""Sequence parallel (Ulysses all-to-all attention) for the Wan transformer.

A video's tokens are split over the ``K`` processes of a sequence-parallel group: each one
runs every block on ``S / K`` tokens. Around self-attention, an all-to-all swaps the sharding
from tokens to heads (each process then attends over all ``S`` tokens with ``H / K`` heads)
and a second one swaps it back (DeepSpeed-Ulysses, Jacobs et al. 2023; the layout of
diffusers' ``_cp_plan`` for ``WanTransformer3DModel``). Cross-attention needs no exchange:
each local query attends to the whole (replicated) prompt. The output projection's tokens are
all-gathered, so the denoiser returns the whole prediction on every process of the group and
the loss is computed as without sequence parallelism.

What is split, on ``WanTransformer3DModel`` (hooks, after LoRA is attached):

- ``rope``'s output ``(cos, sin)`` along the token dimension;
- ``blocks.0``'s input ``hidden_states`` along the tokens (patch embedding, timestep and
  text embeddings are computed whole on every process, they are small);
- Wan 2.2 TI2V's per-token timesteps (a 2-D ``timestep``) at the transformer's input;
- ``proj_out``'s output is all-gathered back along the tokens.

Gradients. Every process of a group holds the same batch and computes the same loss from the
gathered output. The gather's backward sums the K processes' gradients for each process's
tokens (an all-reduce, then its slice), so each process's parameter gradient is ``K`` times
its tokens' share of ``dL/dθ``. Data-parallel backends (DDP, ZeRO, FSDP2) average gradients
over all ``W = K x D`` processes, which gives ``(K / W) Σ_ranks = (1 / D) Σ_groups dL_g/dθ``:
exactly the mean over the ``D`` data-parallel groups, as without sequence parallelism.

Why vidalign's own and not diffusers' context-parallel API (``ContextParallelConfig``,
``ModelMixin.enable_parallelism``, 0.42 here): ``enable_parallelism`` places the model on
``torch.device(type, rank % torch.accelerator.device_count())``, a ZeroDivisionError on a CPU
(gloo) process group, so it cannot run or be tested on CPU; it also builds its own device
mesh over the whole world, where vidalign needs one group per data-parallel replica.
DeepSpeed's ``DistributedAttention`` would tie every backend (DDP, FSDP2) to DeepSpeed for
two all-to-alls. This module's all-to-all is ``torch.distributed.all_to_all`` (gloo and NCCL
both have it) in an autograd function whose backward is the inverse exchange.

Limits: the Wan family only (Wan 2.1 T2V / I2V, Wan 2.2 TI2V and A14B; both experts are
split); the attention heads and the video's token count ``(T/pt)(H/ph)(W/pw)`` must divide
by ``K``; attention goes through diffusers' ``dispatch_attention_fn`` with the processor's
backend (SDPA by default), without an attention mask. The trainer's side (groups, batches
sharded by the data-parallel rank, objectives DPO and GRPO) is ``align.training.core``.
Tested (``tests/test_sequence_parallel.py``, CPU, gloo, DDP): K = 2 in 2 and 4 processes
against one process, Wan 2.1's per-video and Wan 2.2 TI2V's per-token timesteps, gradient
checkpointing on, DPO gradients and GRPO runs; not tested here: GPUs, ZeRO / FSDP2 with K > 1,
the I2V image context and the two-expert A14B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SUPPORTED_FAMILIES = ("wan",)


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """All-to-all: ``x`` cut into K chunks along ``scatter_dim``, chunk ``j`` sent to process
    ``j`` of ``group``; the chunks received are concatenated along ``gather_dim`` in rank order."""
    k = dist.get_world_size(group)
    inputs = [c.contiguous() for c in x.chunk(k, dim=scatter_dim)]
    outputs = [torch.empty_like(c) for c in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """:func:`_exchange` with its adjoint (the exchange with the dimensions swapped) as backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """All-gather along ``dim``; backward: the gradients of the group summed, this process's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        k, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(k, dim=ctx.dim)[r].contiguous(), None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Autograd-capable all-to-all over ``group`` (see :func:`_exchange`)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of ``x`` ``(B, S, H, D)`` (as ``WanAttnProcessor`` applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesWanAttnProcessor:
    """Wan self-attention over a token shard: q, k, v of the local tokens (normed, rotated with
    the local RoPE slice) are exchanged to all tokens x ``H / K`` heads, attended, and exchanged
    back. Cross-attention (``encoder_hidden_states`` given) is the stock processor's."""

    def __init__(self, group: Any, stock: Any):
        self.group, self.stock = group, stock
        self._attention_backend = stock._attention_backend
        self._parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("sequence parallel: Wan self-attention with an attention mask is not supported")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (B, S/K, H, D)
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = (all_to_all(x, 2, 1, self.group) for x in (q, k, v))  # (B, S, H/K, D)
        out = dispatch_attention_fn(q, k, v, dropout_p=0.0, is_causal=False, backend=self._attention_backend)
        out = all_to_all(out.type_as(q), 1, 2, self.group).flatten(2, 3)  # (B, S/K, H*D)
        return attn.to_out[1](attn.to_out[0](out))


def check_heads(heads: int, k: int) -> None:
    """The attention heads must divide by K (each process attends with ``heads / K`` of them)."""
    if heads % k:
        raise ValueError(
            f"sequence_parallel_size {k}: the Wan transformer's {heads} attention heads do not divide by it; "
            f"use a divisor of {heads}"
        )


def local_tokens(latent_size: tuple[int, int, int], patch: tuple[int, int, int], k: int) -> int:
    """Tokens per process of a latent video ``(T, H, W)`` cut into ``patch`` patches; a token
    count that K does not divide is a ValueError naming the sizes."""
    (T, H, W), (pt, ph, pw) = latent_size, patch
    tokens = (T // pt) * (H // ph) * (W // pw)
    if tokens % k:
        raise ValueError(
            f"sequence_parallel_size {k}: a latent video of {T}x{H}x{W} has {tokens} tokens (patch {pt}x{ph}x{pw}), "
            f"not divisible by {k}; change num_frames / height / width"
        )
    return tokens // k


class WanSequenceParallel:
    """The hooks and processors that split one ``WanTransformer3DModel``'s tokens over ``group``
    (see the module docstring). ``local_tokens``: the tokens of this process in the last forward."""

    def __init__(self, transformer: nn.Module, group: Any):
        self.group = group
        self.k, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.local_tokens: int | None = None
        check_heads(transformer.config.num_attention_heads, self.k)
        self.handles = [
            transformer.register_forward_pre_hook(self._check_input, with_kwargs=True),
            transformer.rope.register_forward_hook(lambda m, a, out: tuple(self.split(x) for x in out)),
            transformer.blocks[0].register_forward_pre_hook(self._split_hidden, with_kwargs=True),
            transformer.proj_out.register_forward_hook(lambda m, a, out: _Gather.apply(out, 1, self.group)),
        ]
        for block in transformer.blocks:
            block.attn1.set_processor(UlyssesWanAttnProcessor(group, block.attn1.processor))

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's contiguous slice of ``x`` along ``dim`` (the token dimension)."""
        return x.chunk(self.k, dim=dim)[self.rank]

    def _check_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """At the transformer's input: the token count must divide by K; per-token timesteps
        (Wan 2.2 TI2V) are split like the tokens."""
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.local_tokens = local_tokens(tuple(x.shape[2:]), tuple(module.config.patch_size), self.k)
        t = kwargs.get("timestep")
        if t is not None and t.ndim == 2:
            kwargs = {**kwargs, "timestep": self.split(t)}
        return args, kwargs

    def _split_hidden(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``blocks.0``'s ``hidden_states`` (its first argument) cut to this process's tokens."""
        if args:
            return (self.split(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.split(kwargs["hidden_states"])}


def enable_sequence_parallel(model: Any, group: Any) -> list[WanSequenceParallel]:
    """Split the tokens of ``model``'s Wan transformer(s) over the processes of ``group`` (call
    after LoRA is attached, so the hooks sit on the modules that run). Both experts of a Wan
    2.2 A14B are split. Another family is a ValueError naming the supported ones."""
    from align.models.diffusers.wan import WanVideoModel

    if not isinstance(model, WanVideoModel):
        raise ValueError(
            f"sequence_parallel_size > 1 is supported for the {', '.join(SUPPORTED_FAMILIES)} family "
            f"(WanPipeline: Wan 2.1, Wan 2.2), not for {type(model).__name__}; set sequence_parallel_size: 1"
        )
    denoisers = [model.denoiser] + ([model._other_expert] if model._other_expert is not None else [])
    return [WanSequenceParallel(d.transformer, group) for d in denoisers]


def sequence_parallel_groups(k: int) -> tuple[Any, int, int]:
    """The sequence-parallel group of this process (consecutive ranks ``[g K, (g + 1) K)``), and
    its data-parallel rank ``g = rank // K`` and size ``world // K``. Collective: every process
    creates every group, in the same order. A world that K does not divide is a ValueError."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % k:
        raise ValueError(
            f"sequence_parallel_size {k} does not divide the {world} processes of this launch; use a divisor "
            f"of {world} (the remaining world / K processes are data parallel)"
        )
    mine = None
    for g in range(world // k):
        group = dist.new_group(list(range(g * k, (g + 1) * k)))
        if g == rank // k:
            mine = group
    return mine, rank // k, world // k
