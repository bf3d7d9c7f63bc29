"""The two conditional VAEs over LoRA tokens, and their training loop.

Both work on *normalised* tokens (z-scored per (layer, module) with registry-wide statistics).

- ICM-LoRA (`icm`): prior N(0, I); condition = description embedding (+ an optional task vector).
- SG-LoRA (`sg`): condition c = (μ*, σ*², description embedding); a prior net gives p(z | c) and
  the decoder's output is a residual over μ* scaled by σ*: token = μ* + σ* · dec(z, c).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, reduce
from torch import nn
from tqdm.auto import tqdm

from ..adapters import atomic
from .decoder import GroupProjection, TokenDecoder, TokenLayout
from .errors import GenerationError


@dataclass
class CVAEConfig:
    method: str = "icm"  # icm | sg
    latent: int = 256
    hidden: int = 512
    embed: int = 32
    encoder_hidden: int = 128
    condition_hidden: int = 128
    token_features: int = 16  # sg: per-token projection of μ*, log σ*
    kl_weight: float = 0.005
    top_k: int = 4
    temperature: float = 0.05
    # Weight of the GSNN term of Sohn et al.'s hybrid CVAE objective: the tokens are also decoded
    # from a prior sample, as at inference. Without it the decoder learns to read the target from
    # the posterior's z and to ignore the condition, and a prior z gives an average LoRA.
    prior_weight: float = 0.0
    # icm: "text" reads the description embedding itself; "memory" reads it through the registry,
    # Σ α_k p_k over the top-K experts' description prototypes (α = softmax(sim / temperature)).
    condition_from: str = "text"
    # Decode on top of the registry's multi-task LoRA: B = B_multitask + (decoded B − registry mean),
    # so an untrained icm decoder starts at the multi-task LoRA and sg at it plus retrieval's shift.
    # Trained through the task loss only: reconstruction targets do not know the offset.
    residual: bool = False


def normalise(groups: list[torch.Tensor], mean: list[torch.Tensor], std: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(x - m.to(x)[:, None]) / s.to(x)[:, None] for x, m, s in zip(groups, mean, std)]


def denormalise(groups: list[torch.Tensor], mean: list[torch.Tensor], std: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x * s.to(x)[:, None] + m.to(x)[:, None] for x, m, s in zip(groups, mean, std)]


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class LoraCVAE(nn.Module):
    def __init__(self, layout: TokenLayout, config: CVAEConfig, condition_dim: int) -> None:
        super().__init__()
        self.layout, self.config = layout, config
        self.sg = config.method == "sg"
        c, hc = config, config.condition_hidden
        extra = 2 * c.token_features if self.sg else 0
        self.stat_mu = GroupProjection(layout, c.token_features) if self.sg else None
        self.stat_sigma = GroupProjection(layout, c.token_features) if self.sg else None
        self.condition = nn.Sequential(nn.Linear(condition_dim + extra, hc), nn.GELU())
        self.token_in = GroupProjection(layout, c.encoder_hidden)
        self.token_pos = nn.Parameter(torch.zeros(layout.num_tokens, c.encoder_hidden))
        self.posterior = _mlp(c.encoder_hidden + hc, c.hidden, 2 * c.latent)
        self.prior_net = _mlp(hc, c.hidden, 2 * c.latent) if self.sg else None
        self.decoder = TokenDecoder(layout, c.latent + hc, hidden=c.hidden, embed=c.embed, token_dim=extra)
        for i, g in enumerate(layout.groups):  # registry-wide normalisation, saved with the weights
            self.register_buffer(f"mean_{i}", torch.zeros(len(g.tokens)))
            self.register_buffer(f"std_{i}", torch.ones(len(g.tokens)))
        # Description embeddings share a large common direction; centred and scaled, two tasks whose
        # descriptions differ by a word ("left"/"right") differ by O(1) inputs, not by a few hundredths.
        self.register_buffer("text_mean", torch.zeros(condition_dim))
        self.register_buffer("text_scale", torch.ones(condition_dim))
        if config.residual:  # per group (T_g, W_g): the multi-task LoRA's tokens minus the registry mean
            for i, g in enumerate(layout.groups):
                self.register_buffer(f"offset_{i}", torch.zeros(len(g.tokens), g.width))

    # ------------------------------------------------------------ normalisation
    def set_stats(self, mean: list[torch.Tensor], std: list[torch.Tensor]) -> None:
        for i, (m, s) in enumerate(zip(mean, std)):
            getattr(self, f"mean_{i}").copy_(m)
            getattr(self, f"std_{i}").copy_(s)

    def set_text_stats(self, text: torch.Tensor) -> None:
        """Centre the description part of the condition (the first `text.shape[1]` columns; any task
        vector after it is left alone) on the training descriptions' mean, and scale it so that a
        centred row has unit RMS per dimension."""
        mean, width = text.mean(dim=0), text.shape[1]
        rms = ((text - mean) ** 2).sum(dim=1).mean().div(width).sqrt().clamp_min(1e-6)
        self.text_mean.zero_()[:width] = mean
        self.text_scale.fill_(1.0)[:width] = rms

    def stats(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = len(self.layout.groups)
        return [getattr(self, f"mean_{i}") for i in range(n)], [getattr(self, f"std_{i}") for i in range(n)]

    def normalise(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        return normalise(groups, *self.stats())

    def set_residual(self, base: list[torch.Tensor]) -> None:
        """`base` per group (T_g, W_g) in weight space (the multi-task LoRA's tokens)."""
        for i, (b, m) in enumerate(zip(base, self.stats()[0])):
            getattr(self, f"offset_{i}").copy_(b - m[:, None])

    def offsets(self) -> list[torch.Tensor] | None:
        if not self.config.residual:
            return None
        return [getattr(self, f"offset_{i}") for i in range(len(self.layout.groups))]

    def sample(self, text: torch.Tensor, mu_star: list[torch.Tensor] | None, sigma_star: list[torch.Tensor] | None,
               eps: torch.Tensor) -> list[torch.Tensor]:
        """Weight-space tokens per group (N, T_g, W_g) decoded from the prior, as at inference,
        differentiable in the model's parameters (task-loss training)."""
        cond, feats = self.encode_condition(text, mu_star, sigma_star)
        mu_p, lv_p = self.prior(cond)
        z = mu_p + (0.5 * lv_p).exp() * eps
        out = denormalise(self.decode(z, cond, feats, mu_star, sigma_star), *self.stats())
        offsets = self.offsets()
        return out if offsets is None else [o + off for o, off in zip(out, offsets)]

    # ------------------------------------------------------------ pieces
    def encode_condition(self, text: torch.Tensor, mu_star: list[torch.Tensor] | None = None,
                         sigma_star: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (request condition (N, hc), per-token features (N, T, 2f) or None)."""
        text = (text - self.text_mean) / self.text_scale
        if not self.sg:
            return self.condition(text), None
        assert mu_star is not None and sigma_star is not None and self.stat_mu and self.stat_sigma
        feats = torch.cat([self.stat_mu(mu_star), self.stat_sigma([s.log() for s in sigma_star])], dim=-1)
        pooled = reduce(feats, "n t f -> n f", "mean")
        return self.condition(torch.cat([text, pooled], dim=-1)), feats

    def encode(self, tokens: list[torch.Tensor], cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.gelu(self.token_in(tokens) + self.token_pos)
        stats = self.posterior(torch.cat([reduce(h, "n t f -> n f", "mean"), cond], dim=-1))
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 8)

    def prior(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prior_net is None:
            zeros = cond.new_zeros(cond.shape[0], self.config.latent)
            return zeros, zeros
        mu, logvar = self.prior_net(cond).chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor, cond: torch.Tensor, feats: torch.Tensor | None,
               mu_star: list[torch.Tensor] | None = None,
               sigma_star: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Normalised tokens per group (N, T_g, out·r)."""
        out = self.decoder(torch.cat([z, cond], dim=-1), feats)
        if not self.sg:
            return out
        assert mu_star is not None and sigma_star is not None
        return [m + s * o for m, s, o in zip(mu_star, sigma_star, out)]

    def loss(self, tokens: list[torch.Tensor], text: torch.Tensor, mu_star: list[torch.Tensor] | None,
             sigma_star: list[torch.Tensor] | None, noise: torch.Tensor | None) -> tuple[torch.Tensor, float, float]:
        """MSE + kl_weight · KL(q ‖ p) [+ prior_weight · MSE from a prior z]; `noise=None` decodes the
        posterior mean (and the prior mean) for validation."""
        cond, feats = self.encode_condition(text, mu_star, sigma_star)
        mu_q, lv_q = self.encode(tokens, cond)
        mu_p, lv_p = self.prior(cond)
        z = mu_q if noise is None else mu_q + (0.5 * lv_q).exp() * noise
        mse = self._mse(self.decode(z, cond, feats, mu_star, sigma_star), tokens)
        kl = 0.5 * (lv_p - lv_q + ((lv_q.exp() + (mu_q - mu_p) ** 2) / lv_p.exp()) - 1)
        kl = reduce(kl, "n d -> n", "sum").mean()
        total = mse + self.config.kl_weight * kl
        if self.config.prior_weight > 0:
            z_p = mu_p if noise is None else mu_p + (0.5 * lv_p).exp() * noise
            total = total + self.config.prior_weight * self._mse(self.decode(z_p, cond, feats, mu_star, sigma_star), tokens)
        return total, float(mse.detach()), float(kl.detach())

    @staticmethod
    def _mse(recon: list[torch.Tensor], tokens: list[torch.Tensor]) -> torch.Tensor:
        return sum(((r - t) ** 2).sum() for r, t in zip(recon, tokens)) / sum(t.numel() for t in tokens)


@dataclass
class TrainingSet:
    """Normalised checkpoint tokens and, per description, the condition inputs."""

    tokens: list[torch.Tensor]  # per group (C, T_g, W_g)
    checkpoint_expert: torch.Tensor  # (C,) expert index
    text: torch.Tensor  # (D, dim) description embeddings
    description_expert: torch.Tensor  # (D,) expert index
    mu_star: list[torch.Tensor] | None = None  # sg: per group (D, T_g, W_g), leave-one-out
    sigma_star: list[torch.Tensor] | None = None
    # sg: the same conditions with the expert itself retrievable, as at inference for a registry
    # task; drawn with probability `self_fraction` in training so that the residual learned for
    # unseen tasks is not applied on top of an expert that is already in the prior.
    mu_self: list[torch.Tensor] | None = None
    sigma_self: list[torch.Tensor] | None = None
    self_fraction: float = 0.0
    # icm with examples: per expert S task vectors with a trailing "has examples" flag (E, S, dim + 1)
    task_vectors: torch.Tensor | None = None
    task_vector_dropout: float = 0.5  # so the model also serves requests without examples

    def batch(self, cps: torch.Tensor, descs: torch.Tensor, gen: torch.Generator | None = None) -> tuple[Any, ...]:
        mu = [m[descs] for m in self.mu_star] if self.mu_star is not None else None
        sg = [s[descs] for s in self.sigma_star] if self.sigma_star is not None else None
        if gen is not None and self.self_fraction > 0 and self.mu_self is not None and self.sigma_self is not None:
            own = rearrange(torch.rand(len(descs), generator=gen) < self.self_fraction, "n -> n 1 1")
            mu = [torch.where(own, m[descs], x) for m, x in zip(self.mu_self, mu)]
            sg = [torch.where(own, s[descs], x) for s, x in zip(self.sigma_self, sg)]
        text = self.text[descs]
        if self.task_vectors is not None:  # random set and dropout in training, set 0 in validation
            tv = self.task_vectors[self.checkpoint_expert[cps]]
            if gen is None:
                tv = tv[:, 0]
            else:
                tv = tv[torch.arange(len(cps)), torch.randint(tv.shape[1], (len(cps),), generator=gen)]
                tv = tv * (torch.rand(len(cps), 1, generator=gen) >= self.task_vector_dropout)
            text = torch.cat([text, tv], dim=-1)
        return [t[cps] for t in self.tokens], text, mu, sg

    def pick_descriptions(self, cps: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """One description of each checkpoint's expert: random with `gen`, else the first."""
        experts = self.checkpoint_expert[cps]
        match = rearrange(self.description_expert, "d -> 1 d") == rearrange(experts, "n -> n 1")
        score = torch.rand(match.shape, generator=gen) if gen is not None else -torch.arange(match.shape[1]).float()
        return torch.where(match, score, torch.tensor(-math.inf)).argmax(dim=1)


@dataclass
class FitConfig:
    epochs: int = 60
    lr: float = 3e-3
    batch: int = 8
    seed: int = 0
    val_fraction: float = 0.1
    patience: int = 15
    min_delta: float = 1e-3  # an epoch improves only if it lowers the best validation loss by this fraction
    save_every: int = 25


def fit(model: LoraCVAE, data: TrainingSet, config: FitConfig, *, state_path: Path | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Adam with a cosine schedule, validation each epoch, early stopping; keeps the best weights."""
    gen = torch.Generator().manual_seed(config.seed)
    n = data.checkpoint_expert.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = min(n - 1, round(n * config.val_fraction)) if config.val_fraction > 0 else 0
    val, train = order[:n_val], order[n_val:]
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, fused=True)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    state = {"epoch": 0, "best": math.inf, "bad": 0, "history": []}
    best = copy.deepcopy(model.state_dict())
    if resume and state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        method = saved.get("method", model.config.method)
        if method != model.config.method:
            raise GenerationError(f"cannot resume from {state_path}: it is a {method!r} generator's, "
                                  f"not {model.config.method!r}")
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as exc:  # another spec, latent or hidden size
            raise GenerationError(f"cannot resume from {state_path}: {str(exc).splitlines()[0]}") from exc
        best = saved["best_model"]
        opt.load_state_dict(saved["optim"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        state = saved["state"]
    val_descs = data.pick_descriptions(val, None) if n_val else None
    bar = tqdm(range(state["epoch"], config.epochs), desc=f"train {model.config.method}", unit="epoch")
    for epoch in bar:
        model.train()
        perm = train[torch.randperm(len(train), generator=gen)]
        losses = []
        for start in range(0, len(perm), config.batch):
            cps = perm[start : start + config.batch]
            tokens, text, mu, sg = data.batch(cps, data.pick_descriptions(cps, gen), gen)
            noise = torch.randn(len(cps), model.config.latent, generator=gen)
            loss, _, _ = model.loss(tokens, text, mu, sg, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        train_loss = sum(losses) / len(losses)
        val_loss = train_loss
        if val_descs is not None:
            model.eval()
            with torch.no_grad():
                val_loss = float(model.loss(*data.batch(val, val_descs), None)[0])
        state["history"].append({"epoch": epoch + 1, "train": round(train_loss, 5), "val": round(val_loss, 5)})
        state["epoch"] = epoch + 1
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < state["best"]:
            improved = val_loss < state["best"] * (1 - config.min_delta)
            state["best"], state["bad"] = val_loss, 0 if improved else state["bad"] + 1
            best = copy.deepcopy(model.state_dict())
        else:
            state["bad"] += 1
        stop = state["bad"] >= config.patience
        last = stop or state["epoch"] == config.epochs  # so a later --resume with more epochs starts here
        if state_path is not None and (last or state["epoch"] % config.save_every == 0):
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "best_model": best, "optim": opt.state_dict(),
                        "sched": sched.state_dict(), "gen": gen.get_state(), "state": state,
                        "method": model.config.method}, buf)
            atomic.write_bytes(state_path, buf.getvalue())
        if stop:
            break
    model.load_state_dict(best)
    model.eval()
    return {"epochs": state["epoch"], "best_val": state["best"], "history": state["history"],
            "fit": asdict(config), "train_checkpoints": len(train), "val_checkpoints": n_val}
