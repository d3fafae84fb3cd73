"""Example models written out in code, with seeded weights: nothing is downloaded.

Each factory returns an ``nn.Module`` in eval mode whose ``harlflow_inputs`` attribute lists its
inputs as ``(name, shape, dtype)``; ``harlflow optimize harlflow.examples:resnet18`` needs no
``--input``. Any factory of your own can set the same attribute, or you pass ``--input``.
"""

from __future__ import annotations

import torch
from torch import nn

InputSpec = tuple[str, tuple[int, ...], str]


def _finish(model: nn.Module, inputs: list[InputSpec], seed: int) -> nn.Module:
    """Seed non-trivial BatchNorm statistics, switch to eval mode and attach the input list."""
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.eval()
    model.harlflow_inputs = inputs  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------- tiny MLP (tests)
class TinyMLP(nn.Module):
    """Two dense layers: the smallest model that still has more than one tuning task."""

    def __init__(self, d_in: int = 32, d_hidden: int = 64, d_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_mlp(seed: int = 0) -> nn.Module:
    """A 32→64→16 MLP on a 1×32 input (used by the tests)."""
    torch.manual_seed(seed)
    return _finish(TinyMLP(), [("x", (1, 32), "float32")], seed)


# --------------------------------------------------------------------------- small CNN (README)
class SmallCNN(nn.Module):
    """Conv-BN-ReLU ×2, pooling and a classifier on 32×32 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def small_cnn(seed: int = 0) -> nn.Module:
    """A two-convolution CNN on a 1×3×32×32 input."""
    torch.manual_seed(seed)
    return _finish(SmallCNN(), [("input", (1, 3, 32, 32), "float32")], seed)


# --------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016), ImageNet layout, batch 1."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(seed: int = 0) -> nn.Module:
    """ResNet-18 on a 1×3×224×224 input."""
    torch.manual_seed(seed)
    return _finish(ResNet18(), [("input", (1, 3, 224, 224), "float32")], seed)


# --------------------------------------------------------------------------- BERT-style encoder
class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with separate Q/K/V projections and a GELU FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, ffn)
        self.ff2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim**0.5)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class BertEncoder(nn.Module):
    """A BERT-style encoder stack over precomputed embeddings."""

    def __init__(self, layers: int = 4, hidden: int = 256, heads: int = 4, ffn: int = 1024):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def bert_encoder(seed: int = 0) -> nn.Module:
    """4 layers, hidden 256, 4 heads, FFN 1024, on a 1×128×256 embedding input."""
    torch.manual_seed(seed)
    return _finish(BertEncoder(), [("hidden_states", (1, 128, 256), "float32")], seed)


# --------------------------------------------------------------------------- ViT-style
class ViTLayer(nn.Module):
    """Pre-norm transformer layer with separate Q/K/V projections (as in ViT)."""

    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.attn = EncoderLayer(hidden, heads, mlp)  # reuses the projections and the FFN
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        h = self.ln1(x)
        b, s, d = h.shape
        q, k, v = a._split(a.q(h)), a._split(a.k(h)), a._split(a.v(h))
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / (a.head_dim**0.5), dim=-1)
        x = x + a.o(torch.matmul(att, v).transpose(1, 2).reshape(b, s, d))
        return x + a.ff2(nn.functional.gelu(a.ff1(self.ln2(x))))


class ViT(nn.Module):
    """Patch embedding (a strided convolution), pre-norm encoder layers, mean pooling, head."""

    def __init__(
        self,
        image: int = 64,
        patch: int = 8,
        hidden: int = 192,
        layers: int = 4,
        heads: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.embed = nn.Conv2d(3, hidden, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, hidden) * 0.02)
        self.layers = nn.ModuleList(ViTLayer(hidden, heads, 4 * hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


def vit_small(seed: int = 0) -> nn.Module:
    """A ViT-style classifier: 8×8 patches of a 1×3×64×64 image, 4 layers, hidden 192."""
    torch.manual_seed(seed)
    return _finish(ViT(), [("image", (1, 3, 64, 64), "float32")], seed)


# --------------------------------------------------------------------------- Inception-style
class InceptionBlock(nn.Module):
    """Four parallel branches (1×1; 1×1→3×3; 1×1→5×5; pool→1×1) concatenated."""

    def __init__(self, c_in: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()

        def cbr(i: int, o: int, k: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU()
            )

        self.b1 = cbr(c_in, c1, 1)
        self.b3 = nn.Sequential(cbr(c_in, c3r, 1), cbr(c3r, c3, 3))
        self.b5 = nn.Sequential(cbr(c_in, c5r, 1), cbr(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(c_in, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class InceptionNet(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            InceptionBlock(64, 32, 48, 64, 8, 16, 16), InceptionBlock(128, 64, 64, 96, 16, 32, 32)
        )
        self.fc = nn.Linear(224, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)
        )


def inception_small(seed: int = 0) -> nn.Module:
    """An Inception-style net: a stem and two 4-branch blocks on a 1×3×64×64 image."""
    torch.manual_seed(seed)
    return _finish(InceptionNet(), [("image", (1, 3, 64, 64), "float32")], seed)


# --------------------------------------------------------------------------- SqueezeNet-style
class Fire(nn.Module):
    """Squeeze 1×1, then parallel expand 1×1 and 3×3 convolutions, concatenated."""

    def __init__(self, c_in: int, s: int, e: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, s, 1)
        self.e1 = nn.Conv2d(s, e, 1)
        self.e3 = nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], dim=1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            Fire(64, 16, 64),
            Fire(128, 16, 64),
            nn.MaxPool2d(3, 2),
            Fire(128, 32, 128),
            Fire(256, 32, 128),
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(256, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet_small(seed: int = 0) -> nn.Module:
    """A SqueezeNet-style net (four Fire modules) on a 1×3×96×96 image."""
    torch.manual_seed(seed)
    return _finish(SqueezeNet(), [("image", (1, 3, 96, 96), "float32")], seed)
