"""Held-out model families for ``bench/e2e.py --suite families``: public architectures written
here in torch (none is bundled with harlflow or seen by any learned part), exported to ONNX the
way other tools ship them (old opsets included), at sizes two cores tune in minutes.

Each entry is ``name -> (build, input shape, opset)``; :func:`export` writes ``NAME.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _bn_relu(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _head(channels: int, classes: int = 100) -> list[nn.Module]:
    """Global average pooling and a linear classifier."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand, projection shortcut on a stride."""

    def __init__(self, cin: int, mid: int, stride: int = 1):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            _bn_relu(cin, mid, 1),
            _bn_relu(mid, mid, 3, stride),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def resnet50ish() -> nn.Module:
    """ResNet-50's stem and bottlenecks at half width, one block per stage, 112x112 input."""
    return nn.Sequential(
        _bn_relu(3, 32, 7, 2),
        nn.MaxPool2d(3, 2, 1),
        Bottleneck(32, 32),
        Bottleneck(128, 64, 2),
        Bottleneck(256, 128, 2),
        Bottleneck(512, 256, 2),
        *_head(1024),
    )


def resnet50_deep() -> nn.Module:
    """ResNet-50's full depth (3, 4, 6, 3 bottlenecks) at half width, 112x112 input: a
    ~230-node graph, for the rewrite stage's time budget."""
    layers, cin = [_bn_relu(3, 32, 7, 2), nn.MaxPool2d(3, 2, 1)], 32
    for i, (mid, n) in enumerate(((32, 3), (64, 4), (128, 6), (256, 3))):
        for j in range(n):
            layers.append(Bottleneck(cin, mid, 2 if j == 0 and i else 1))
            cin = mid * 4
    return nn.Sequential(*layers, *_head(cin))


class InvertedResidual(nn.Module):
    """MobileNet-v2: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            _bn_relu(cin, mid, 1),
            _bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.body(x)
        return x + y if self.use_res else y


def mobilenet_ish() -> nn.Module:
    return nn.Sequential(
        _bn_relu(3, 16, 3, 2),
        InvertedResidual(16, 24, 2),
        InvertedResidual(24, 24, 1),
        InvertedResidual(24, 48, 2),
        InvertedResidual(48, 48, 1),
        InvertedResidual(48, 96, 2),
        *_head(96),
    )


class DenseBlock(nn.Module):
    """DenseNet: every layer's output concatenated onto its input."""

    def __init__(self, cin: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(_bn_relu(cin + i * growth, 4 * growth, 1), _bn_relu(4 * growth, growth))
            for i in range(layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def densenet_ish() -> nn.Module:
    return nn.Sequential(
        _bn_relu(3, 32, 3, 2),
        DenseBlock(32, 16, 4),
        _bn_relu(96, 64, 1),
        nn.AvgPool2d(2),
        DenseBlock(64, 16, 4),
        *_head(128),
    )


class Inception(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.b1 = _bn_relu(cin, c, 1)
        self.b3 = nn.Sequential(_bn_relu(cin, c // 2, 1), _bn_relu(c // 2, c))
        self.b5 = nn.Sequential(_bn_relu(cin, c // 4, 1), _bn_relu(c // 4, c // 2, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _bn_relu(cin, c // 2, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def inception_ish() -> nn.Module:
    return nn.Sequential(
        _bn_relu(3, 32, 3, 2),
        Inception(32, 32),
        nn.MaxPool2d(2),
        Inception(96, 64),
        *_head(192),
    )


class ShuffleUnit(nn.Module):
    """ShuffleNet-v2's unit: split, 1x1 / depthwise 3x3 / 1x1 on one half, concat, shuffle."""

    def __init__(self, c: int):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            _bn_relu(h, h, 1),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            _bn_relu(h, h, 1),
        )

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, hh, w = y.shape
        return y.view(n, 2, c // 2, hh, w).transpose(1, 2).reshape(n, c, hh, w)


def shufflenet_ish() -> nn.Module:
    return nn.Sequential(
        _bn_relu(3, 48, 3, 2),
        nn.MaxPool2d(3, 2, 1),
        ShuffleUnit(48),
        ShuffleUnit(48),
        _bn_relu(48, 96, 3, 2),
        ShuffleUnit(96),
        *_head(96),
    )


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.s = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.s(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


def squeezenet_ish() -> nn.Module:
    """SqueezeNet 1.1 as the zoo ships it (ceil-mode pooling, a 1000-way 1x1 conv head)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64),
        Fire(128, 16, 64),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(128, 32, 128),
        Fire(256, 32, 128),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(256, 48, 192),
        Fire(384, 64, 256),
        nn.Conv2d(512, 1000, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class Block(nn.Module):
    """A pre-norm transformer block with separate Q/K/V projections and an erf GELU MLP."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        if self.causal:
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            att = att.masked_fill(mask, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, t: int = 64, d: int = 128, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, t, d))
        self.blocks = nn.Sequential(*(Block(d, 4, True) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos)))


class ViT(nn.Module):
    def __init__(self, image: int = 64, patch: int = 8, d: int = 128, layers: int = 2):
        super().__init__()
        n = (image // patch) ** 2
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls, self.pos = (
            nn.Parameter(torch.zeros(1, 1, d)),
            nn.Parameter(torch.zeros(1, n + 1, d)),
        )
        self.blocks = nn.Sequential(*(Block(d, 4, False) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 100)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


FAMILIES = {
    "gpt_decoder": (GPT, (1, 64), 17),
    "vit": (ViT, (1, 3, 64, 64), 17),
    "resnet50ish": (resnet50ish, (1, 3, 112, 112), 9),
    "resnet50_deep": (resnet50_deep, (1, 3, 112, 112), 9),
    "mobilenet": (mobilenet_ish, (1, 3, 112, 112), 11),
    "densenet": (densenet_ish, (1, 3, 64, 64), 11),
    "inception": (inception_ish, (1, 3, 64, 64), 9),
    "shufflenet": (shufflenet_ish, (1, 3, 112, 112), 11),
    "squeezenet": (squeezenet_ish, (1, 3, 224, 224), 9),
}


def source(model: str, directory: Path) -> str:
    """What ``harlflow optimize`` takes for a bench's model name: ``family:NAME`` exported to
    ONNX in ``directory``, else a bundled example."""
    if model.startswith("family:"):
        return str(export(model.removeprefix("family:"), directory))
    return f"harlflow.examples:{model}"


def export(name: str, directory: Path, seed: int = 0) -> Path:
    """``NAME.onnx`` in ``directory``: the family's network with seeded weights (batch-norm
    statistics randomised, so they are not the identity), exported by TorchScript's exporter;
    and ``NAME.pt2``, the same network as a ``torch.export`` program (PyTorch eager's run)."""
    build, shape, opset = FAMILIES[name]
    torch.manual_seed(seed)
    net = build().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randint(0, 512, shape) if name == "gpt_decoder" else torch.randn(shape)
    path = Path(directory) / f"{name}.onnx"
    torch.export.save(torch.export.export(net, (x,)), str(path.with_suffix(".pt2")))
    torch.onnx.export(
        net,
        (x,),
        str(path),
        opset_version=opset,
        dynamo=False,
        input_names=["x"],
        do_constant_folding=False,  # keep BatchNormalization nodes, as zoo models have them
    )
    return path
