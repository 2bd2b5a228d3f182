"""Tiny random vision-language models for the `modules:` tests, built on the CPU with
transformers in about a second each: Gemma 3 and Mistral 3, each a text decoder, a vision
tower and a projector.

Three models per architecture, every tensor different (seeds 1, 2, 3): a and b in float16,
c in float32. Every 1-D tensor is random (init's zeros and ones would hide a merge's
mistakes).

Gemma 3 (Gemma3ForConditionalGeneration, mergekit's gemma3vl.json):
  text decoder : 4 layers (text_config.num_hidden_layers), layer_types
                 [sliding, full, sliding, full] (explicit: slices must carry them)
  vision tower : SigLIP, 3 layers (vision_config.num_hidden_layers), no pooling head
  projector    : mm_input_projection_weight [32, 64], mm_soft_emb_norm.weight [32]
  tied embeddings: no lm_head.weight in the file, as transformers saves Gemma 3
`layout="hub"`: tensor names as the Hub's google/gemma-3-*-it checkpoints and mergekit's
gemma3vl.json spell them (`vision_tower.vision_model.*`); transformers loads them.
`layout="v5"`: as transformers 5 saves them (`vision_tower.*`), which mergekit 0.1.5 cannot
read.

Mistral 3 (Mistral3ForConditionalGeneration, mergekit's mistral3.json), as transformers 5
saves it -- the Hub's layout (mistralai/Mistral-Small-3.1-*), the names mergekit lists:
  text decoder : Mistral, 4 layers (text_config.num_hidden_layers), no per-layer lists;
                 its own lm_head (language_model.lm_head.weight), as the Hub's
  vision tower : Pixtral, 3 layers (vision_config.num_hidden_layers) under
                 vision_tower.transformer.layers; patch_conv and ln_pre before them
  projector    : norm, patch_merger.merging_layer, linear_1, linear_2 (no biases)
  an image of 32x32 pixels: 4x4 patches of 8, merged 2x2 into 4 image tokens
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TEXT_LAYERS, VISION_LAYERS = 4, 3
IMAGE, BOI, EOI = 255, 253, 254
MODELS = {"a": (1, torch.float16), "b": (2, torch.float16), "c": (3, torch.float32)}
PIXELS = 32


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
        num_hidden_layers=VISION_LAYERS, num_attention_heads=2, image_size=PIXELS, patch_size=8,
        vision_use_head=False,
    )  # fmt: skip
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
    )  # fmt: skip


def mistral3_config(projector_bias: bool = False) -> Any:
    from transformers import Mistral3Config

    text = dict(
        model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, sliding_window=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    vision = dict(
        model_type="pixtral", hidden_size=32, intermediate_size=64,
        num_hidden_layers=VISION_LAYERS, num_attention_heads=2, head_dim=16,
        image_size=PIXELS, patch_size=8,
    )  # fmt: skip
    # tie_word_embeddings at both levels: transformers 5 reads the top one (default True)
    return Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=IMAGE,
        spatial_merge_size=2, tie_word_embeddings=False,
        multimodal_projector_bias=projector_bias,
    )  # fmt: skip


def build(out: Path, seed: int, dtype: torch.dtype, layout: str = "hub") -> Path:
    """One random Gemma 3 saved by transformers, renamed to the Hub's layout if asked."""
    from transformers import Gemma3ForConditionalGeneration

    _save(Gemma3ForConditionalGeneration, config(), out, seed, dtype)
    if layout == "hub":
        file = out / "model.safetensors"
        tensors = {hub_name(k): v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def build_mistral3(out: Path, seed: int, dtype: torch.dtype, projector_bias: bool = False) -> Path:
    """One random Mistral 3, as transformers 5 saves it (the Hub's names); with
    `projector_bias`, linear_1.bias and linear_2.bias too (mergekit's JSON lists neither)."""
    from transformers import Mistral3ForConditionalGeneration

    cfg = mistral3_config(projector_bias)
    return _save(Mistral3ForConditionalGeneration, cfg, out, seed, dtype)


def _save(cls: Any, cfg: Any, out: Path, seed: int, dtype: torch.dtype) -> Path:
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    return out


def hub_name(name: str) -> str:
    """A transformers-5 saved name in the Hub's layout."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def build_all(root: Path, layout: str = "hub") -> dict[str, Path]:
    """Gemma 3s a, b (float16) and c (float32) under root."""
    return {n: build(root / n, seed, dtype, layout) for n, (seed, dtype) in MODELS.items()}


def build_all_mistral3(root: Path) -> dict[str, Path]:
    """Mistral 3s a, b (float16) and c (float32) under root."""
    return {n: build_mistral3(root / n, seed, dtype) for n, (seed, dtype) in MODELS.items()}


def forward(path: Path) -> torch.Tensor:
    """Load a Gemma 3 with transformers (no key missing or unexpected) and run one
    image+text forward pass; the logits, finite."""
    from transformers import Gemma3ForConditionalGeneration

    ids = torch.tensor([[2, BOI] + [IMAGE] * 4 + [EOI, 10, 11, 12]])
    return _forward(Gemma3ForConditionalGeneration, path, input_ids=ids)


def forward_mistral3(path: Path) -> torch.Tensor:
    """The same for a Mistral 3: its 4 image tokens, then text."""
    from transformers import Mistral3ForConditionalGeneration

    ids = torch.tensor([[1] + [IMAGE] * 4 + [10, 11, 12]])
    sizes = torch.tensor([[PIXELS, PIXELS]])
    return _forward(Mistral3ForConditionalGeneration, path, input_ids=ids, image_sizes=sizes)


def _forward(cls: Any, path: Path, **inputs: torch.Tensor) -> torch.Tensor:
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pixels = torch.randn(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits: torch.Tensor = model.eval()(pixel_values=pixels, **inputs).logits
    assert torch.isfinite(logits).all()
    return logits
