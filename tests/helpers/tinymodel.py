"""Write a tiny random-weights llama model as GGUF, for tests with a real server.

Owns: ``write_tiny_llama()``, which writes a complete, loadable llama-architecture
GGUF file (hyperparameters, a byte-level SentencePiece vocabulary, a ChatML chat
template, seeded f32 weights) in a few milliseconds, so no test downloads weights.
Not here: starting ``llama-server`` on it (``tests/helpers/llama.py``).

Vocabulary: ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), the two ChatML markers as
control tokens, the SentencePiece space ``\u2581``, then one byte token
``<0xNN>`` per byte. There are no merges and no word pieces, so llama.cpp's SPM
tokenizer gives one token per space and falls back to one token per UTF-8 byte
for everything else: any text tokenizes, and an ASCII prompt of ``n``
characters costs exactly ``n + 1`` tokens (the BOS). ``add_space_prefix`` is
off so that count holds.

Invariants: the same arguments and seed give byte-identical files (the digest
of the model is stable across runs); every tensor shape follows llama.cpp's
llama loader (numpy shapes are ggml's ``ne`` reversed).

Known limitations: the weights are noise, so generated text is noise and EOS
is rare; tests must bound ``n_predict``/``max_tokens`` and assert on shapes,
counts and timings, never on text. Only f32 tensors are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

ARCH: Final = "llama"
UNK_ID: Final = 0
BOS_ID: Final = 1
EOS_ID: Final = 2
_CONTROL_TOKENS: Final = ("<|im_start|>", "<|im_end|>")
# SentencePiece writes a space as U+2581; without this token a space would
# fall back to its three UTF-8 bytes.
SPACE_TOKEN: Final = "\u2581"
SPACE_ID: Final = 3 + len(_CONTROL_TOKENS)
FIRST_BYTE_ID: Final = SPACE_ID + 1
VOCAB_SIZE: Final = FIRST_BYTE_ID + 256

# ChatML, the shape most OpenAI-compatible servers expect; rendered by
# llama-server's Jinja engine for /v1/chat/completions.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FFN_MULTIPLIER: Final = 4
_RMS_EPS: Final = 1e-5
_ROPE_FREQ_BASE: Final = 10000.0
_WEIGHT_SCALE: Final = 0.02


def write_tiny_llama(
    path: str | Path,
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ctx: int = 512,
    seed: int = 0,
) -> Path:
    """Write the model to ``path`` and return it as a ``Path``."""
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    out = Path(path)
    writer = gguf.GGUFWriter(str(out), ARCH)
    _add_hparams(writer, n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_ctx=n_ctx)
    _add_vocab(writer)
    rng = np.random.default_rng(seed)
    for name, tensor in _tensors(rng, n_layers=n_layers, n_embd=n_embd):
        writer.add_tensor(name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_hparams(
    writer: gguf.GGUFWriter, *, n_layers: int, n_embd: int, n_head: int, n_ctx: int
) -> None:
    writer.add_name("sidecar-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(VOCAB_SIZE)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(_FFN_MULTIPLIER * n_embd)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(_ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(_RMS_EPS)


def _add_vocab(writer: gguf.GGUFWriter) -> None:
    tokens = ["<unk>", "<s>", "</s>", *_CONTROL_TOKENS]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.CONTROL] * len(_CONTROL_TOKENS)
    tokens.append(SPACE_TOKEN)
    types.append(gguf.TokenType.NORMAL)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _tensors(
    rng: np.random.Generator, *, n_layers: int, n_embd: int
) -> list[tuple[str, npt.NDArray[np.float32]]]:
    n_ff = _FFN_MULTIPLIER * n_embd
    ones = np.ones(n_embd, dtype=np.float32)
    tensors = [
        ("token_embd.weight", _random(rng, VOCAB_SIZE, n_embd)),
        ("output_norm.weight", ones),
        ("output.weight", _random(rng, VOCAB_SIZE, n_embd)),
    ]
    for i in range(n_layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", ones),
            (f"blk.{i}.attn_q.weight", _random(rng, n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", _random(rng, n_embd, n_embd)),
            (f"blk.{i}.attn_v.weight", _random(rng, n_embd, n_embd)),
            (f"blk.{i}.attn_output.weight", _random(rng, n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", ones),
            (f"blk.{i}.ffn_gate.weight", _random(rng, n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", _random(rng, n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", _random(rng, n_embd, n_ff)),
        ]
    return tensors


def _random(rng: np.random.Generator, rows: int, cols: int) -> npt.NDArray[np.float32]:
    # Small weights keep activations finite through the residual stream.
    return (rng.standard_normal((rows, cols)) * _WEIGHT_SCALE).astype(np.float32)
