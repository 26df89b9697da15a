"""`--judge clip:DIR`: zero-shot classification with a local CLIP model folder.

The images of a concept are ranked over candidate labels by the cosine similarity of their CLIP
image embedding with each label's text embedding (the mean over `templates`, as CLIP's zero-shot
ImageNet classifier does). The labels are `candidates` (e.g. Imagenette's ten classes, one a line
in `--candidates FILE`) and every concept of the evaluation. With candidates, every evaluated
concept must be one of them, and the preserved concepts default to the other candidates.

DIR is a transformers `CLIPModel` folder in safetensors (config.json, model.safetensors, and a
tokenizer); images are resized and normalised as its preprocessor_config.json says (CLIP's own
mean and std without one). Nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...config import check_options, check_template, option
from ...errors import UserError, first_line

# CLIP's image normalisation (openai/clip-vit-*), where the folder gives none
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPJudgeConfig:
    path: str = option("", "a local CLIPModel folder (safetensors, with its tokenizer)")
    candidates: list[str] = option([], "labels ranked besides the evaluated concepts (--candidates FILE: one a line)")
    templates: list[str] = option(["a photo of a {}"], "texts of a label, averaged in CLIP's text space; {} stands for the label")
    prompt_templates: list[str] = option(["a photo of a {}"], "prompts that draw a concept's images, used in turn; {} stands for the concept")
    batch_size: int = option(64, "images embedded at a time", at_least=1)

    def __post_init__(self):
        check_options(self)
        if not self.path:
            raise UserError("the clip judge needs a local CLIP model folder: --judge clip:DIR")
        for template in self.templates + self.prompt_templates:
            check_template(template)
        if not self.templates or not self.prompt_templates:
            raise UserError("the clip judge needs at least one template and one prompt template")


class CLIPJudge:
    config_class = CLIPJudgeConfig

    def __init__(self, cfg: CLIPJudgeConfig):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        from ...models.family import read_json
        from ...models.loading import quiet_loading

        quiet_loading()
        self.cfg = cfg
        folder = Path(cfg.path).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a CLIP model folder (no config.json)")
        try:
            # on this process's GPU where there is one (torchrun sets it), else the CPU
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval().to(self.device)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types here; the user needs one line
            raise UserError(f"could not load the CLIP model in {folder}: {first_line(exc)}") from None
        preprocessor = folder / "preprocessor_config.json"
        settings = read_json(preprocessor) if preprocessor.is_file() else {}
        mean, std = settings.get("image_mean", CLIP_MEAN), settings.get("image_std", CLIP_STD)
        if not all(isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) and x == x for x in v) for v in (mean, std)) or 0 in std:
            raise UserError(f"{preprocessor}: image_mean and image_std must be three numbers each (std not 0)")
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._label_embeddings: dict[str, "torch.Tensor"] = {}

    def check(self, concept: str) -> None:
        if self.cfg.candidates and concept not in self.cfg.candidates:
            raise UserError(f"the concept {concept!r} is not one of the clip judge's candidates ({len(self.cfg.candidates)} labels)")

    def prompts(self, concept: str, n: int) -> list[str]:
        templates = self.cfg.prompt_templates
        return [templates[i % len(templates)].format(concept) for i in range(n)]

    def siblings(self, concept: str) -> list[str]:
        return [c for c in self.cfg.candidates if c != concept]

    def lookalike(self, concept: str) -> str | None:
        return None

    def recognised(self, images: np.ndarray, concept: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        names = list(dict.fromkeys([*self.cfg.candidates, *labels]))
        with torch.no_grad():
            text = torch.stack([self._label_embedding(name) for name in names])  # (L, d)
            similarity = self.image_embeddings(images) @ text.T  # (N, L)
        ranked = torch.argsort(similarity, dim=1, descending=True).numpy()
        target = names.index(concept)
        return ranked[:, 0] == target, (ranked[:, :5] == target).any(axis=1)

    def image_embeddings(self, images: np.ndarray) -> "torch.Tensor":
        """(N, d) unit CLIP embeddings of images (N, H, W, 3) in [0, 1]."""
        import torch

        out = []
        for start in range(0, len(images), self.cfg.batch_size):
            pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + self.cfg.batch_size])).permute(0, 3, 1, 2).float().to(self.device)
            pixels = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
            pixels = (pixels.clamp(0, 1) - self.mean) / self.std
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1).cpu())
        return torch.cat(out)

    def text_embeddings(self, texts: list[str]) -> "torch.Tensor":
        """(T, d) unit CLIP embeddings of texts."""
        import torch

        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=ids.input_ids.to(self.device), attention_mask=ids.attention_mask.to(self.device)).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1).cpu()

    def _label_embedding(self, name: str) -> "torch.Tensor":
        import torch

        if name not in self._label_embeddings:
            mean = self.text_embeddings([t.format(name) for t in self.cfg.templates]).mean(0)
            self._label_embeddings[name] = torch.nn.functional.normalize(mean, dim=-1)
        return self._label_embeddings[name]
