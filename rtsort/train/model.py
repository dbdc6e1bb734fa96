"""The spike autoencoder (torch; training only).

Tokens are snippet channels: each token carries one channel's T samples
(noise units) and that channel's position relative to the peak channel, so the
same weights read any probe layout. A small pre-norm Transformer mixes the K
tokens; the latent is a linear map of the flattened tokens (keeping which
channel said what); an MLP decoder reconstructs the snippet. K tokens instead
of one per sample keeps onnxruntime's cost per spike low (see
tools/bench_encoder.py).

With a linear path (``train.linear_path``) the latent is a fixed linear map
of the flattened snippet (training sets it to the snippets' first principal
components and freezes it) plus the Transformer's output, which then learns
what that projection misses.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm Transformer layer over a fixed number of tokens, written with static shapes.

    ``nn.TransformerEncoderLayer`` exports to ONNX with ~150 shape-computing
    nodes (Shape, Gather, Concat...) that cost onnxruntime ~100 us per call at
    batch 1; with the token count and head layout fixed in the graph this
    block exports to ~25 nodes.
    """

    def __init__(self, n_tokens: int, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_tokens, self.n_heads, self.d_head = n_tokens, n_heads, d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.scale = self.d_head ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, h, dh = self.n_tokens, self.n_heads, self.d_head
        qkv = self.qkv(self.norm1(x)).reshape(-1, k, 3, h, dh).permute(2, 0, 3, 1, 4)  # (3, B, H, K, dh)
        att = torch.softmax(torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * self.scale, dim=-1)
        mixed = torch.matmul(att, qkv[2]).permute(0, 2, 1, 3).reshape(-1, k, h * dh)
        x = x + self.out(mixed)
        return x + self.ff(self.norm2(x))


class SpikeEncoder(nn.Module):
    """(B, T, K) noise-unit snippets + (B, K, 2) relative positions (um) -> (B, D) latents."""

    def __init__(self, n_samples: int, n_channels: int, latent_dim: int = 24, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 4, position_scale_um: float = 50.0, linear_path: bool = False):
        super().__init__()
        self.n_samples, self.n_channels, self.latent_dim = n_samples, n_channels, latent_dim
        self.position_scale_um = float(position_scale_um)
        self.embed = nn.Linear(n_samples, d_model)
        self.pos = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.blocks = nn.Sequential(*[Block(n_channels, d_model, n_heads, 2 * d_model) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(n_channels * d_model, latent_dim)
        self.linear = nn.Linear(n_samples * n_channels, latent_dim, bias=False) if linear_path else None

    def forward(self, waveforms: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(waveforms.transpose(1, 2)) + self.pos(positions / self.position_scale_um)
        tokens = self.norm(self.blocks(tokens))
        latent = self.head(tokens.reshape(-1, self.n_channels * tokens.shape[-1]))
        if self.linear is not None:
            latent = latent + self.linear(waveforms.reshape(-1, self.n_samples * self.n_channels))
        return latent


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
    def __init__(self, n_samples: int, n_channels: int, latent_dim: int = 24, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 4, linear_path: bool = False):
        super().__init__()
        self.encoder = SpikeEncoder(n_samples, n_channels, latent_dim, d_model, n_layers, n_heads,
                                    linear_path=linear_path)
        self.decoder = SpikeDecoder(n_samples, n_channels, latent_dim)
        # contrastive projection head (SimCLR): the loss acts on it, the latent stays general
        self.project = nn.Sequential(nn.Linear(latent_dim, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, waveforms: torch.Tensor, positions: torch.Tensor):
        z = self.encoder(waveforms, positions)
        return z, self.decoder(z)
