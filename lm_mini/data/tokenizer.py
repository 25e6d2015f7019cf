"""Tokenizers: load one from a local directory, or train a small byte-level BPE for demos and tests.

The trained tokenizer is saved in the Hugging Face layout (``tokenizer.json`` +
``tokenizer_config.json``), so ``AutoTokenizer.from_pretrained(dir)`` reloads it offline (as
``TokenizersBackend`` in transformers 5) with identical encodings.

It never adds special tokens by itself (no BOS/EOS post-processor): the conversation templates
decide where ``<s>`` / ``<|begin_of_text|>`` / ``</s>`` / ``<|eot_id|>`` go (see
``lm_mini.data.conversation``), and they call the tokenizer with ``add_special_tokens=False``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

# Specials of the Llama/Vicuna tokenizer, then the tokens the llama3 template writes in its text.
SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)
# Llama-3's pre-tokenizer split. Unlike GPT-2's, a run of newlines stays one piece whatever
# follows it ("\n\n" + "answer" splits the same as "\n\n" alone), so the llama3 template's
# header/answer boundary is a token boundary and label masking stays aligned.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], out_dir: Union[str, Path], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on ``texts``, save it to ``out_dir`` and return it.

    Deterministic: the same texts give byte-identical files. The vocabulary (256 byte tokens,
    the special tokens, the merges) has at most ``vocab_size`` entries.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet)} bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return wrapped


def sentencepiece_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


def load_tokenizer(path: Union[str, Path]) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local directory, never the hub; clear errors.

    A SentencePiece-only directory (``tokenizer.model`` + ``tokenizer_config.json``, as the LLaVA-1.5 and Vicuna
    releases ship) is converted by transformers with the ``sentencepiece`` package."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {p}")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((p / name).is_file() for name in known):
        raise ValueError(f"{p} is not a tokenizer directory: it has none of {', '.join(known)}")
    if (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file() and not sentencepiece_available():
        # transformers would fall back to a tiktoken reader and name the wrong package
        raise ValueError(f"{p} holds a SentencePiece tokenizer only (tokenizer.model, no tokenizer.json), which needs the "
                         "'sentencepiece' package: pip install sentencepiece (an lm_mini dependency: reinstall lm_mini)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types here; say which directory failed
        raise ValueError(f"cannot load a tokenizer from {p}: {e}") from e
    if tokenizer.pad_token_id is None:
        # Batches are right-padded; a Llama tokenizer has no pad token (LLaVA uses unk for it).
        if (tokenizer.unk_token or tokenizer.eos_token) is None:
            raise ValueError(f"tokenizer in {p} has no pad, unk or eos token to pad batches with; "
                             "set pad_token (or eos_token) in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
