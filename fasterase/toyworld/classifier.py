"""The world's classifier: one small CNN with a head per label family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .world import COLOURS, OBJECTS, STYLES


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.MaxPool2d(2),
    )


class WorldClassifier(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] -> logits over objects, colours and styles."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({
            "object": nn.Linear(256, len(OBJECTS)),
            "colour": nn.Linear(256, len(COLOURS)),
            "style": nn.Linear(256, len(STYLES)),
        })

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> "WorldClassifier":
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 32, 32, 3) in [0, 1] (numpy or torch) -> (N, 3, 32, 32) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not torch.is_tensor(images) else images.float()
    return x.permute(0, 3, 1, 2) * 2 - 1


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise, so that the classifier also reads a generator's softer images."""
    n = x.shape[0]
    blurred = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    x = blur * blurred + (1 - blur) * x
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.12
    return x + noise * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def predict(classifier: WorldClassifier, images: np.ndarray, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Logits for (N, 32, 32, 3) images in [0, 1]."""
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        for name, logits in classifier(to_model_input(images[start : start + batch_size])).items():
            outputs.setdefault(name, []).append(logits)
    return {name: torch.cat(parts) for name, parts in outputs.items()}
