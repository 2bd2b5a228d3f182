"""The header of a GGUF output (plan/gguf.py planned its tensors): magic, metadata
(architecture, tokenizer: write/gguf_meta.py), and every tensor's name, shape, type and
offset, padded to the data alignment. Serialized by gguf-py's GGUFWriter, so the bytes
are llama.cpp's own format; the tensor data follows, streamed by the shard writer at
the offsets the plan fixed (GGUFWriter lays them out the same way: each padded to 32).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lazymerge.plan.gguf import ALIGNMENT
from lazymerge.plan.model import MergePlan
from lazymerge.read.config import model_dir
from lazymerge.read.gguf import is_gguf

# general.file_type: llama.cpp's LLAMA_FTYPE for each quant (the mixes name theirs).
FILE_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K",
    "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M",
}  # fmt: skip


def gguf_headers(plan: MergePlan, name: str) -> tuple[bytes, ...]:
    """The header bytes of each file of `plan`'s GGUF (one, or its splits), up to its
    first tensor's data; `name` is the model's general.name. A split GGUF's first file
    holds the metadata, every file the split keys, as gguf-py's writer writes them."""
    import gguf
    import numpy as np

    from lazymerge.meaning.gguf import arch_of
    from lazymerge.meaning.gguf_types import gguf_shape
    from lazymerge.write.gguf_meta import write_metadata

    out, config = plan.recipe.output, plan.config
    assert out.quant is not None and config is not None  # plan/gguf.py checked both
    arch = arch_of(config, f"{plan.base.path}/config.json")
    with tempfile.TemporaryDirectory(prefix="lazymerge-gguf-") as tmp:
        path = Path(tmp) / "header.gguf"
        split = out.shard_size if len(plan.shards) > 1 else 0
        w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch], split_max_size=split or 0)
        write_metadata(w, config, _tokenizer_source(plan), tokenizer=out.tokenizer, name=name)
        w.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[out.quant]]))
        for t in plan.tensors:
            e = t.encoding
            assert e is not None  # every tensor of a GGUF plan has one
            if e.part:
                continue  # a later expert of a stacked tensor: in its first one's info
            shape = gguf_shape(out.quant, (e.stack, *t.shape) if e.stack else t.shape)
            qtype = gguf.GGMLQuantizationType(e.qtype)
            nbytes = t.nbytes * max(e.stack, 1)
            w.add_tensor_info(e.name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        # plan/gguf.py cut the files by gguf-py's rule: the same tensors in each
        cut = [[t.encoding.name for t in s.tensors if t.encoding and not t.encoding.part]
               for s in plan.shards]  # fmt: skip
        assert [list(files) for files in w.tensors] == cut, "GGUF splits differ from gguf-py's"
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        files = w.format_shard_names(path)
        headers = [f.read_bytes() for f in files]
    return tuple(h + bytes(-len(h) % ALIGNMENT) for h in headers)


def _tokenizer_source(plan: MergePlan) -> Path:
    """Where the tokenizer comes from: the base's directory, or a GGUF base itself."""
    path = plan.base.path
    return path if path.is_file() and is_gguf(path) else model_dir(path)
