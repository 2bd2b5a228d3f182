"""Tiny random Gemma 3 vision-language models (Gemma3ForConditionalGeneration: a text
decoder, a SigLIP vision tower, a projector) for the `modules:` tests, built on the CPU
with transformers in about a second.

Three models, every tensor different (seeds 1, 2, 3): a and b in float16, c in float32.
  text decoder : 4 layers (text_config.num_hidden_layers), layer_types
                 [sliding, full, sliding, full] (explicit: slices must carry them)
  vision tower : 3 layers (vision_config.num_hidden_layers), no pooling head (as Gemma 3)
  projector    : mm_input_projection_weight [32, 64], mm_soft_emb_norm.weight [32]
  tied embeddings: no lm_head.weight in the file, as transformers saves Gemma 3

`layout="hub"`: tensor names as the Hub's google/gemma-3-*-it checkpoints and mergekit's
gemma3vl.json spell them (`vision_tower.vision_model.*`); transformers loads them.
`layout="v5"`: as transformers 5 saves them (`vision_tower.*`), which mergekit 0.1.5 cannot
read. Every 1-D tensor is random (init's zeros and ones would hide a merge's mistakes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TEXT_LAYERS, VISION_LAYERS = 4, 3
IMAGE, BOI, EOI = 255, 253, 254
MODELS = {"a": (1, torch.float16), "b": (2, torch.float16), "c": (3, torch.float32)}


def config() -> Any:
    from transformers import Gemma3Config

    text = dict(
        model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * (TEXT_LAYERS // 2),
        query_pre_attn_scalar=16,
    )  # fmt: skip
    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
        num_hidden_layers=VISION_LAYERS, num_attention_heads=2, image_size=32, patch_size=8,
        vision_use_head=False,
    )  # fmt: skip
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
    )  # fmt: skip


def build(out: Path, seed: int, dtype: torch.dtype, layout: str = "hub") -> Path:
    """One random model saved by transformers, renamed to the Hub's layout if asked."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    if layout == "hub":
        file = out / "model.safetensors"
        tensors = {hub_name(k): v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def hub_name(name: str) -> str:
    """A transformers-5 saved name in the Hub's layout."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def build_all(root: Path, layout: str = "hub") -> dict[str, Path]:
    """a, b (float16) and c (float32) under root."""
    return {n: build(root / n, seed, dtype, layout) for n, (seed, dtype) in MODELS.items()}


def forward(path: Path) -> torch.Tensor:
    """Load with transformers (no key missing or unexpected) and run one image+text
    forward pass; the logits, finite."""
    from transformers import Gemma3ForConditionalGeneration

    model, info = Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor([[2, BOI] + [IMAGE] * 4 + [EOI, 10, 11, 12]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    return logits
