"""GGUF metadata (lazymerge.write.gguf_meta): a tiny random model of each family we
write, saved by transformers with a tokenizer from lazymerge.testing_tokenizer, written
here as a complete F32 GGUF (our metadata, every tensor under llama.cpp's name, Q and K
rows permuted as llama.cpp's converter permutes them), then read back by an independent
reader: gguf-py's for the keys, transformers' GGUF loader for the rest -- the same
logits as the safetensors model (names, permutation and hyperparameters all right) and
the same token ids as the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lazymerge.errors import InputError
from lazymerge.meaning.gguf import (
    ROPE_FREQS,
    arch_of,
    permuted_heads,
    rope_freqs,
    row_order,
    skipped,
    tensor_name,
)
from lazymerge.testing_tokenizer import corpus, write_tokenizer
from lazymerge.write.gguf_meta import check_tokenizer, write_metadata

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
TEXTS = ["hello world, it's 2024!", "ba be bi bo\nka ke", " spaced  out .", "<|eot_id|>zo"]


def make_model(directory: Path, model_type: str, vocab: int, **extra: Any) -> None:
    """A random tiny `model_type` model, saved by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **SHAPE, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms and biases not all 1 and 0
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)


def write_gguf(model_dir: Path, path: Path) -> None:
    """A complete F32 GGUF of the model in `model_dir`, as a converter would write it."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = arch_of(config, "config.json")
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(w, config, model_dir, name="tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, t in load_file(model_dir / "model.safetensors").items():
        data = t.float().numpy()
        if (heads := permuted_heads(arch, name, config)) is not None:
            data = data[row_order(data.shape[0], heads)]
        w.add_tensor(tensor_name(arch, name, config["num_hidden_layers"]), data)
    if (freqs := rope_freqs(arch, config)) is not None:
        w.add_tensor(ROPE_FREQS, freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fields(path: Path) -> dict[str, Any]:
    """The GGUF's keys, each as a Python value (arrays as lists)."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


CASES = {  # model_type -> (tokenizer style, its vocabulary, the model's, config extras)
    "llama": ("bpe", 96, 96, {}),
    "mistral": ("spm", 400, 400, {"sliding_window": None}),
    # The embedding has rows the tokenizer leaves unused (Qwen's do): [PADn] tokens.
    "qwen2": ("bpe", 100, 128, {"tie_word_embeddings": True}),
    # head_dim is not hidden/heads, as in Qwen3-0.6B; 128 because transformers' GGUF
    # loader does not read attention.key_length for qwen3 (llama.cpp does) but defaults it.
    "qwen3": ("bpe", 96, 96, {"head_dim": 128}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(model_type, model dir with tokenizer, dir holding only model.gguf)."""
    model_type = request.param
    style, n_tokens, vocab, extra = CASES[model_type]
    model_dir = tmp_path_factory.mktemp(model_type)
    make_model(model_dir, model_type, vocab, **extra)
    write_tokenizer(model_dir, n_tokens, style=style)
    # Alone in its folder, so transformers reads the GGUF's tokenizer, not tokenizer.json.
    gguf_dir = tmp_path_factory.mktemp(f"{model_type}-gguf")
    write_gguf(model_dir, gguf_dir / "model.gguf")
    return model_type, model_dir, gguf_dir


def test_keys_read_back(written: Any) -> None:
    model_type, model_dir, gguf_dir = written
    style, n_tokens, vocab, _ = CASES[model_type]
    f = fields(gguf_dir / "model.gguf")
    arch = f["general.architecture"]
    assert arch == {"mistral": "llama"}.get(model_type, model_type)
    assert f["general.name"] == "tiny"
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.context_length"] == 256
    assert f[f"{arch}.embedding_length"] == 64
    assert f[f"{arch}.feed_forward_length"] == 128
    assert (f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]) == (4, 2)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    config = json.loads((model_dir / "config.json").read_text())
    assert f[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    if model_type == "qwen3":
        assert f["qwen3.attention.key_length"] == f["qwen3.attention.value_length"] == 128
    if arch == "llama":
        assert (f["llama.vocab_size"], f["llama.rope.dimension_count"]) == (vocab, 16)
    assert f["tokenizer.ggml.model"] == ("llama" if style == "spm" else "gpt2")
    assert f["tokenizer.ggml.pre"] == ("default" if style == "spm" else "llama-bpe")
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) == vocab
    assert f["tokenizer.ggml.tokens"][n_tokens:] == [f"[PAD{i}]" for i in range(n_tokens, vocab)]
    assert f["tokenizer.ggml.token_type"][n_tokens:] == [gguf.TokenType.UNUSED] * (vocab - n_tokens)
    assert f["tokenizer.ggml.merges"]  # llama.cpp refuses a gpt2 vocabulary without
    bos = f["tokenizer.ggml.tokens"][f["tokenizer.ggml.bos_token_id"]]
    eos = f["tokenizer.ggml.tokens"][f["tokenizer.ggml.eos_token_id"]]
    assert (bos, eos) == (
        ("<s>", "</s>") if style == "spm" else ("<|begin_of_text|>", "<|end_of_text|>")
    )
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert "assistant: " in f["tokenizer.chat_template"]
    if style == "spm":
        types = f["tokenizer.ggml.token_type"]
        assert types[3:259] == [gguf.TokenType.BYTE] * 256
        assert len(f["tokenizer.ggml.scores"]) == vocab


def test_transformers_loads_the_same_model(written: Any) -> None:
    from transformers import AutoModelForCausalLM

    _, model_dir, gguf_dir = written
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="model.gguf", dtype=torch.float32
    )
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want, got = ours(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_transformers_reads_the_same_tokenizer(written: Any) -> None:
    from transformers import AutoTokenizer

    _, model_dir, gguf_dir = written
    ours = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text), text
    assert (loaded.bos_token, loaded.eos_token) == (ours.bos_token, ours.eos_token)
    assert loaded.chat_template == ours.chat_template


def test_llama_cpp_loads_it(written: Any) -> None:
    """Where llama-cpp-python is installed: llama.cpp reads our tokenizer as transformers
    does and computes the same logits (F32, so only its kernels' rounding differs)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, gguf_dir = written
    llm = llama_cpp.Llama(str(gguf_dir / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in (t for t in TEXTS if t[0] != " "):  # see test_llama_cpp_sentencepiece_agrees
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
    ids = hf.encode(TEXTS[0])
    llm.eval(ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores)[: len(ids)], want, atol=1e-3)


def config_of(model_type: str = "llama", vocab: int = 96, **extra: Any) -> dict[str, Any]:
    """A config.json as transformers 5 writes one, without building a model."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=vocab, **SHAPE, **extra)
    out: dict[str, Any] = config.to_dict()
    out["architectures"] = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    return out


def metadata(tmp_path: Path, config: dict[str, Any], model_dir: Path, **kw: Any) -> dict[str, Any]:
    """The keys write_metadata writes (read back by gguf-py)."""
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch_of(config, "config.json")])
    write_metadata(w, config, model_dir, **kw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return fields(path)


def one_line(e: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(e.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_without_tokenizer_files(tmp_path: Path) -> None:
    config = config_of()
    with pytest.raises(InputError) as e:
        metadata(tmp_path, config, tmp_path)
    one_line(e, f"{tmp_path}: no tokenizer.json", "--no-tokenizer", "llama.cpp refuses")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a")
    with pytest.raises(InputError) as e:
        metadata(tmp_path, config, tmp_path)
    one_line(e, "tokenizer.model but no tokenizer.json", "save_pretrained", "--no-tokenizer")
    f = metadata(tmp_path, config, tmp_path, tokenizer=False)  # --no-tokenizer
    assert f["general.name"] == tmp_path.name
    assert f["llama.block_count"] == 2
    assert not [k for k in f if k.startswith("tokenizer.")]


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        ({"model_type": "gpt_neox"}, ["model_type 'gpt_neox'", "not supported yet", "'gptneox'"]),
        ({"model_type": "falcon"}, ["not supported yet", "convert_hf_to_gguf.py"]),
        ({"model_type": "rwkv5x"}, ["llama.cpp's converter has no architecture for it"]),
        ({"architectures": ["LlamaForCausalLM"]}, ["no model_type", "llama, mistral"]),
        (
            {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
            ["llama.cpp's converter has no LlamaForSequenceClassification"],
        ),
    ],
)
def test_architectures_we_cannot_write(config: dict[str, Any], parts: list[str]) -> None:
    with pytest.raises(InputError) as e:
        arch_of(config, "base/config.json")
    one_line(e, "base/config.json: ", *parts)


def test_architectures_we_write() -> None:
    config = config_of()
    assert arch_of(config, "c") == gguf.MODEL_ARCH.LLAMA
    # The converter goes by the class; a Llama saved as Mistral's is still llama.cpp's llama.
    assert (
        arch_of({**config, "architectures": ["MistralForCausalLM"]}, "c") == gguf.MODEL_ARCH.LLAMA
    )
    del config["architectures"]
    assert arch_of(config, "c") == gguf.MODEL_ARCH.LLAMA
    assert arch_of(config_of("qwen2"), "c") == gguf.MODEL_ARCH.QWEN2
    del config["hidden_size"]
    with pytest.raises(InputError) as e:
        arch_of(config, "base/config.json")
    one_line(e, "base/config.json: no number hidden_size, which a GGUF states")


def test_names_and_permutation() -> None:
    llama, qwen = gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN3
    assert tensor_name(llama, "model.layers.1.self_attn.q_proj.weight", 2) == "blk.1.attn_q.weight"
    assert (
        tensor_name(qwen, "model.layers.0.self_attn.k_norm.weight", 2) == "blk.0.attn_k_norm.weight"
    )
    assert tensor_name(qwen, "model.layers.0.self_attn.k_proj.bias", 2) == "blk.0.attn_k.bias"
    assert tensor_name(llama, "lm_head.weight", 2) == "output.weight"
    for bad in ("model.layers.2.mlp.up_proj.weight", "model.vision.weight"):
        with pytest.raises(InputError) as e:
            tensor_name(llama, bad, 2)
        one_line(e, f"{bad}: llama.cpp has no name for this tensor in a llama GGUF of 2 layers")
    assert skipped("model.layers.0.self_attn.rotary_emb.inv_freq")
    config = config_of()
    heads = [
        permuted_heads(llama, f"model.layers.0.self_attn.{p}_proj.weight", config) for p in "qkvo"
    ]
    assert heads == [4, 2, None, None]
    assert permuted_heads(qwen, "model.layers.0.self_attn.q_proj.weight", config) is None
    # Head 0's 4 rows (first half 0 1, second half 2 3) interleaved, then head 1's.
    assert row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_rope_scaling(tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    llama3 |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama3["original_max_position_embeddings"] = 64  # so each of the three bands has some
    hf = LlamaConfig(**SHAPE, rope_parameters=llama3)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    freqs = rope_freqs(gguf.MODEL_ARCH.LLAMA, config_of(rope_parameters=llama3))
    assert freqs is not None and freqs.dtype == np.float32
    np.testing.assert_allclose(freqs, (plain / scaled).numpy(), rtol=1e-6)
    assert len(set(freqs.tolist())) > 2  # 1, 8 and something between
    # transformers 4's spelling: rope_scaling beside rope_theta
    old = {**config_of(), "rope_theta": 500000.0, "rope_scaling": {**llama3, "rope_theta": None}}
    del old["rope_parameters"], old["rope_scaling"]["rope_theta"]
    np.testing.assert_array_equal(rope_freqs(gguf.MODEL_ARCH.LLAMA, old), freqs)
    assert rope_freqs(gguf.MODEL_ARCH.LLAMA, config_of()) is None

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 32.0}
    yarn["original_max_position_embeddings"] = 128
    f = metadata(tmp_path, config_of("qwen2", rope_parameters=yarn), tmp_path, tokenizer=False)
    assert f["qwen2.rope.scaling.type"] == "yarn"
    assert (f["qwen2.rope.scaling.factor"], f["qwen2.rope.scaling.original_context_length"]) == (
        4.0,
        128,
    )
    assert f["qwen2.rope.scaling.yarn_beta_fast"] == 32.0
    dynamic = config_of(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(InputError) as e:
        metadata(tmp_path, dynamic, tmp_path, tokenizer=False)
    one_line(e, "config.json: rope_type 'dynamic': not supported yet")


def tokenizer_keys(tmp_path: Path, edit: Any = None, vocab: int = 96) -> dict[str, Any]:
    """The tokenizer keys of a tiny Llama 3-style tokenizer, tokenizer.json `edit`ed."""
    write_tokenizer(tmp_path, 96)
    if edit is not None:
        data = json.loads((tmp_path / "tokenizer.json").read_text())
        edit(data)
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return metadata(tmp_path, config_of(vocab=vocab), tmp_path)


def _split(regex: str) -> Any:
    def edit(data: dict[str, Any]) -> None:
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex

    return edit


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_pre_tokenizer_names(tmp_path: Path) -> None:
    assert tokenizer_keys(tmp_path)["tokenizer.ggml.pre"] == "llama-bpe"
    assert tokenizer_keys(tmp_path, _split(QWEN2_SPLIT))["tokenizer.ggml.pre"] == "qwen2"

    def no_ignore_merges(data: dict[str, Any]) -> None:
        data["model"]["ignore_merges"] = False

    assert tokenizer_keys(tmp_path, no_ignore_merges)["tokenizer.ggml.pre"] == "smaug-bpe"

    def gpt2(data: dict[str, Any]) -> None:
        data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}

    assert tokenizer_keys(tmp_path, gpt2)["tokenizer.ggml.pre"] == "gpt-2"
    with pytest.raises(InputError) as e:
        tokenizer_keys(tmp_path, _split(r"\p{L}+|\s+"))
    one_line(e, "tokenizer.json: a pre-tokenizer llama.cpp has no name lazymerge knows for")


def test_tokenizers_we_cannot_write(tmp_path: Path) -> None:
    def unigram(data: dict[str, Any]) -> None:
        data["model"]["type"] = "Unigram"

    with pytest.raises(InputError) as e:
        tokenizer_keys(tmp_path, unigram)
    one_line(e, "tokenizer.json: a Unigram tokenizer", "--no-tokenizer")
    with pytest.raises(InputError) as e:
        tokenizer_keys(tmp_path, vocab=64)
    one_line(e, "tokenizer.json: token id 95 but config.json's vocab_size is 64")

    def listed(data: dict[str, Any]) -> None:
        data["model"]["vocab"] = list(data["model"]["vocab"])

    with pytest.raises(InputError) as e:
        tokenizer_keys(tmp_path, listed)
    one_line(e, "tokenizer.json: malformed (", "replace it with the base's")
    with pytest.raises(InputError) as e:  # what a planner calls before writing anything
        check_tokenizer(tmp_path, 96)
    one_line(e, "tokenizer.json: malformed (")
    (tmp_path / "tokenizer.json").write_text("[1]")
    with pytest.raises(InputError) as e:
        check_tokenizer(tmp_path, 96)
    one_line(e, "tokenizer.json: not a JSON object")
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(InputError) as e:
        metadata(tmp_path, config_of(), tmp_path)
    one_line(e, "tokenizer_config.json: not valid JSON")


def spm_tokenize(text: str, f: dict[str, Any]) -> list[int]:
    """llama.cpp's sentencepiece tokenizer (llm_tokenizer_spm), re-implemented: from single
    characters, merge the adjacent pair whose join is a token of the highest score (the
    leftmost of equals) until none is; what is left unknown, as <0xNN> byte tokens."""
    tokens, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"]
    index = {t: i for i, t in enumerate(tokens)}
    pieces = list(("▁" + text).replace(" ", "▁"))  # add_space_prefix
    while joins := [
        (scores[index[a + b]], -k) for k, (a, b) in enumerate(pairwise(pieces)) if a + b in index
    ]:
        k = -max(joins)[1]
        pieces[k : k + 2] = [pieces[k] + pieces[k + 1]]
    ids = []
    for p in pieces:
        ids += [index[p]] if p in index else [index[f"<0x{b:02X}>"] for b in p.encode()]
    return ids


def test_llama_cpp_sentencepiece_agrees(tmp_path: Path) -> None:
    """Our sentencepiece-style scores (merge ranks) make llama.cpp's algorithm cut text as
    the Hugging Face tokenizer does (transformers reads the merges instead)."""
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, 1000, seed=1, style="spm")
    f = metadata(tmp_path, config_of(vocab=1000), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    # Not text that starts with a space: llama.cpp prefixes a space always, as
    # sentencepiece does; transformers' Metaspace only where there is none.
    for text in [line.strip() for line in corpus(7)[:100]] + [t for t in TEXTS if t[0] != " "]:
        assert spm_tokenize(text, f) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize(
    ("style", "vocab"), [("bpe", 96), ("bpe", 128), ("bpe", 1000), ("spm", 1000)]
)
def test_tiny_tokenizer(tmp_path: Path, style: Any, vocab: int) -> None:
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "a", vocab, seed=3, style=style)
    write_tokenizer(tmp_path / "b", vocab, seed=3, style=style)
    text = (tmp_path / "a" / "tokenizer.json").read_text()
    assert text == (tmp_path / "b" / "tokenizer.json").read_text()  # seeded
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == vocab
    ids = tok.encode(TEXTS[0])
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == TEXTS[0]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == f"{tok.bos_token}user: hi\n"
    with pytest.raises(ValueError, match="needs a vocabulary of"):
        write_tokenizer(tmp_path / "c", 63 if style == "bpe" else 319, style=style)
