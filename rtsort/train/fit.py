"""Training the spike autoencoder: augmentation, the loop, early stopping.

Loss = reconstruction of the clean snippet from an augmented view (noise,
temporal jitter, amplitude scaling, a colliding spike) + ``contrastive_weight``
x NT-Xent between the latents of two augmented views of the same spike, so the
latent keeps what tells spikes apart rather than only what reconstructs them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import TrainConfig
from .model import SpikeAutoencoder

log = logging.getLogger("rtsort.train")


def seed_everything(seed: int, threads: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


class Augment:
    """Random views of a batch of noise-unit snippets (B, T, K); all randomness from ``gen``."""

    def __init__(self, pool: torch.Tensor, gen: torch.Generator, noise: float = 0.4, jitter: int = 1,
                 scale: float = 0.1, collision_p: float = 0.2):
        self.pool, self.gen = pool, gen
        self.noise, self.jitter, self.scale, self.collision_p = noise, jitter, scale, collision_p
        self.smooth = torch.tensor([0.5, 1.0, 0.5]).view(1, 1, 3) / np.sqrt(1.5)

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.gen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k = x.shape
        # temporal jitter: shift each snippet by -j..j samples (edges repeat)
        shift = torch.randint(-self.jitter, self.jitter + 1, (b,), generator=self.gen)
        idx = (torch.arange(t)[None, :] - shift[:, None]).clamp(0, t - 1)
        out = torch.gather(x, 1, idx[:, :, None].expand(b, t, k))
        out = out * (1.0 + self.scale * (2.0 * self._rand(b, 1, 1) - 1.0))
        # a colliding spike: another snippet, shifted and scaled down
        hit = self._rand(b) < self.collision_p
        if hit.any():
            other = self.pool[torch.randint(0, self.pool.shape[0], (int(hit.sum()),), generator=self.gen)]
            lag = torch.randint(-t // 3, t // 3 + 1, (other.shape[0],), generator=self.gen)
            oidx = (torch.arange(t)[None, :] - lag[:, None]).clamp(0, t - 1)
            other = torch.gather(other, 1, oidx[:, :, None].expand(-1, t, k))
            out[hit] = out[hit] + other * (0.3 + 0.5 * self._rand(other.shape[0], 1, 1))
        # band-limited noise: white noise through a short smoothing kernel, per channel
        white = torch.randn(b * k, 1, t + 2, generator=self.gen)
        coloured = F.conv1d(white, self.smooth).view(b, k, t).transpose(1, 2)
        return out + self.noise * coloured


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among all other views of the batch."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    n = a.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def fit_autoencoder(x: np.ndarray, positions: np.ndarray, cfg: TrainConfig, seed: int = 0,
                    progress: bool = True) -> tuple[SpikeAutoencoder, dict]:
    """Train on noise-unit snippets ``x`` (n, T, K) with relative positions (n, K, 2); return (model, history)."""
    gen = seed_everything(seed, cfg.threads)
    n, t, k = x.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, min(n // 10, 2000))
    val, tr = order[:n_val], order[n_val:]
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    P = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32))
    model = SpikeAutoencoder(t, k, cfg.latent_dim, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.linear_path)
    if model.encoder.linear is not None:  # the training snippets' principal components, fixed
        flat = x[tr].reshape(tr.size, -1).astype(np.float64)
        components = np.linalg.svd(flat - flat.mean(axis=0), full_matrices=False)[2][:cfg.latent_dim]
        with torch.no_grad():
            model.encoder.linear.weight.zero_()
            model.encoder.linear.weight[:components.shape[0]] = torch.from_numpy(components.astype(np.float32))
        model.encoder.linear.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    steps_per_epoch = max(1, int(np.ceil(tr.size / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.epochs * steps_per_epoch)
    augment = Augment(X[tr], gen)
    history = {"train_loss": [], "val_loss": [], "epochs": 0, "best_epoch": 0, "seconds": 0.0}
    best, best_state, stale = np.inf, None, 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="train autoencoder", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.from_numpy(tr[rng.permutation(tr.size)])
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if idx.numel() < 2:
                continue
            clean, pos = X[idx], P[idx]
            v1, v2 = augment(clean), augment(clean)
            z1, rec1 = model(v1, pos)
            loss = F.mse_loss(rec1, clean)
            if cfg.contrastive_weight > 0:
                z2 = model.encoder(v2, pos)
                loss = loss + cfg.contrastive_weight * nt_xent(model.project(z1), model.project(z2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        model.eval()
        with torch.no_grad():
            vloss = float(F.mse_loss(model(X[val], P[val])[1], X[val]))
        history["train_loss"].append(total / max(1, tr.size))
        history["val_loss"].append(vloss)
        bar.set_postfix(val=f"{vloss:.3f}")
        if vloss < best - 1e-4:
            best, stale, history["best_epoch"] = vloss, 0, epoch
            best_state = {k_: v.clone() for k_, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    history["epochs"] = epoch + 1
    history["seconds"] = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if model.encoder.linear is not None:
        with torch.no_grad():  # how much of the latent the Transformer adds to the fixed projection
            linear = model.encoder.linear(X[val].reshape(val.size, -1))
            learnt = model.encoder(X[val], P[val]) - linear
        history["transformer_share"] = float(learnt.var(0).sum() / (linear + learnt).var(0).sum())
        log.info("latent: the Transformer's part holds %.1f %% of its variance (the rest: the fixed projection)",
                 100 * history["transformer_share"])
    log.info("autoencoder: %d snippets, %d epochs (best %d, held-out reconstruction %.4f), %.1f s",
             n, history["epochs"], history["best_epoch"] + 1, best, history["seconds"])
    return model, history
