"""The networks behind the built-in bench tasks: an MLP, a UNet, a GPT and a BERT-style encoder.

Every matrix multiply is an ``nn.Linear`` (or a convolution in the UNet), so a recipe that
swaps Linear layers (fp8) reaches all of them. Each model casts floating-point inputs to
the dtype of its own parameters on entry, so a model stored in bf16 (``bf16-true``) accepts
the fp32 batches the tasks produce; under autocast that cast changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "GPT", "Encoder", "TransformerConfig", "UNet"]


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class MLP(nn.Module):
    """Feedforward classifier: ``in -> hidden (ReLU) x depth -> classes``.

    Example:
        >>> MLP(64, [256], 10)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, hidden: list[int], classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(_param_dtype(self)))  # (B, classes)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    groups = min(4, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Two-level UNet for binary segmentation: logits of shape ``(B, 1, H, W)``.

    Example:
        >>> UNet(channels=8)(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, channels: int, in_channels: int = 1) -> None:
        super().__init__()
        c = channels
        self.enc1 = _conv_block(in_channels, c)
        self.enc2 = _conv_block(c, 2 * c)
        self.mid = _conv_block(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _conv_block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = _conv_block(2 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_param_dtype(self))
        e1 = self.enc1(x)  # (B, c, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2c, H/2, W/2)
        m = self.mid(F.max_pool2d(e2, 2))  # (B, 4c, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))  # (B, 2c, H/2, W/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))  # (B, c, H, W)
        return self.out(d1)  # (B, 1, H, W)


@dataclass(frozen=True, slots=True)
class TransformerConfig:
    """Shape of a GPT or encoder.

    Args:
        vocab_size: number of token ids.
        seq_len: longest sequence (positions learned).
        n_layer: number of blocks.
        n_head: attention heads per block (``d_model % n_head == 0``).
        d_model: width of the residual stream.
        classes: output classes of the encoder's head (unused by the GPT).
    """

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    classes: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")


class _Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x GELU MLP."""

    def __init__(self, cfg: TransformerConfig, causal: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head, self.causal = cfg.n_head, causal
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))  # (B, T, C)


class _Trunk(nn.Module):
    def __init__(self, cfg: TransformerConfig, causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg, causal) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(_init_weights)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.cfg.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class GPT(_Trunk):
    """Decoder-only language model (nanoGPT-style, causal attention); logits ``(B, T, V)``.

    Example:
        >>> cfg = TransformerConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=32)
        >>> GPT(cfg)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg, causal=True)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(idx))  # (B, T, V)


class Encoder(_Trunk):
    """BERT-style encoder classifier (bidirectional attention, mean pooling); ``(B, classes)``.

    Example:
        >>> cfg = TransformerConfig(64, 16, n_layer=1, n_head=2, d_model=32, classes=4)
        >>> Encoder(cfg)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 4])
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        if cfg.classes < 2:
            raise ValueError(f"classes={cfg.classes} must be at least 2 for a classifier")
        super().__init__(cfg, causal=False)
        self.head = nn.Linear(cfg.d_model, cfg.classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(idx).mean(dim=1))  # (B, classes)
