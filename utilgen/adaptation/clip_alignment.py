"""CLIP class-text alignment: the paper's drift term for ILPO's prompt ascent (docs/method.md, "ILPO").

penalty_i = 1 - cos(CLIP_image(x_i), CLIP_text(template.format(class_name(y_i)))), in [0, 2],
differentiable in the images. Optional: it needs a CLIP model (vision + text towers) in a local
directory (``transformers.CLIPModel`` layout: config.json, weights, tokenizer files); no hub.
transformers is imported only when one is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# CLIP's image normalisation (openai/clip-vit-*: preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipAlignment:
    """Scores how well images match their class text under a frozen CLIP model."""

    def __init__(self, model: nn.Module, tokenizer, class_names: Sequence[str], template: str = "a photo of a {}."):
        self.model = model.eval().requires_grad_(False)
        self.class_names = tuple(class_names)
        self.image_size = int(model.config.vision_config.image_size)
        device = next(model.parameters()).device
        tokens = tokenizer([template.format(name) for name in self.class_names], padding=True, return_tensors="pt")
        with torch.no_grad():
            text = model.text_model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            ).pooler_output
            self.text_features = F.normalize(model.text_projection(text).float(), dim=-1)  # (K, E)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_directory(
        cls,
        path: str | Path,
        class_names: Sequence[str],
        *,
        template: str = "a photo of a {}.",
        device: str | torch.device = "cpu",
    ) -> ClipAlignment:
        """A CLIP model and tokenizer saved with ``save_pretrained`` in ``path`` (loaded offline)."""
        from transformers import CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(model, tokenizer, class_names, template)

    def penalty(self, images: Tensor, labels: Tensor) -> Tensor:
        """(N,) 1 - cosine similarity of images (N, C, H, W) in [0, 1] (C = 1 or 3) to their class text."""
        device = self.text_features.device
        x = images.to(device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        pooled = self.model.vision_model(pixel_values=(x - self.mean) / self.std).pooler_output
        image_features = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # (N, E)
        cosine = (image_features * self.text_features[labels.to(device)]).sum(dim=-1)
        return (1.0 - cosine).to(images.device)
