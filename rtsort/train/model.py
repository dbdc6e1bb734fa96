"""The spike autoencoder (torch; training only).

Tokens are snippet channels: each token carries one channel's T samples
(noise units) and that channel's position relative to the peak channel, so the
same weights read any probe layout. A small pre-norm Transformer mixes the K
tokens; the latent is a linear map of the flattened tokens (keeping which
channel said what); an MLP decoder reconstructs the snippet. K tokens instead
of one per sample keeps onnxruntime's cost per spike low (see
tools/bench_encoder.py).
"""

from __future__ import annotations

import torch
from torch import nn


class SpikeEncoder(nn.Module):
    """(B, T, K) noise-unit snippets + (B, K, 2) relative positions (um) -> (B, D) latents."""

    def __init__(self, n_samples: int, n_channels: int, latent_dim: int = 12, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 4, position_scale_um: float = 50.0):
        super().__init__()
        self.n_samples, self.n_channels, self.latent_dim = n_samples, n_channels, latent_dim
        self.position_scale_um = float(position_scale_um)
        self.embed = nn.Linear(n_samples, d_model)
        self.pos = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(n_channels * d_model, latent_dim)

    def forward(self, waveforms: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(waveforms.transpose(1, 2)) + self.pos(positions / self.position_scale_um)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.flatten(1))


class SpikeDecoder(nn.Module):
    """(B, D) latents -> (B, T, K) snippets."""

    def __init__(self, n_samples: int, n_channels: int, latent_dim: int, hidden: int = 256):
        super().__init__()
        self.shape = (n_samples, n_channels)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_samples * n_channels))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent).view(-1, *self.shape)


class SpikeAutoencoder(nn.Module):
    def __init__(self, n_samples: int, n_channels: int, latent_dim: int = 12, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.encoder = SpikeEncoder(n_samples, n_channels, latent_dim, d_model, n_layers, n_heads)
        self.decoder = SpikeDecoder(n_samples, n_channels, latent_dim)
        # contrastive projection head (SimCLR): the loss acts on it, the latent stays general
        self.project = nn.Sequential(nn.Linear(latent_dim, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, waveforms: torch.Tensor, positions: torch.Tensor):
        z = self.encoder(waveforms, positions)
        return z, self.decoder(z)
