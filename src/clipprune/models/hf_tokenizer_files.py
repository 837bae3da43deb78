"""Write the tokenizer and image-processor files of a Hugging Face CLIP folder from open_clip's bundled vocabulary.

    python -m clipprune.models.hf_tokenizer_files <dir>

``<dir>`` holds a transformers ``CLIPModel`` saved with ``save_pretrained`` (config.json + weights) but no
tokenizer, as converted or fine-tuned weights often come. The command writes, next to the weights,
``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (what
transformers' ``CLIPTokenizer`` reads) and ``preprocessor_config.json`` (CLIP's image preprocessing for the
vision config's ``image_size``). It is only right for models trained with OpenAI's CLIP vocabulary (OpenAI
CLIP, open_clip models with the default tokenizer): the files say nothing about another model's tokens.

The vocabulary is re-derived from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` the way open_clip's
``SimpleTokenizer`` builds it: the 256 byte symbols (GPT-2's byte-to-unicode table), the same with the
end-of-word mark ``</w>``, one token per merge (the first 49152 − 256 − 2 merge lines after the header, in
rank order), then start- and end-of-text: 49408 ids, spelt as OpenAI's hub files spell the specials
(``<|startoftext|>``, ``<|endoftext|>``). The ids equal open_clip's up to the end-of-text token; after it
open_clip pads with 0 and these files, like OpenAI's hub files, with ``<|endoftext|>``. That changes no
feature: the text tower's attention is causal and it pools at the first end-of-text token. (Padding with
``!``, id 0, would make ``!`` a special token and split ``!!`` in captions.)

Existing tokenizer files are never overwritten (one-line error, nothing written); an existing
``preprocessor_config.json`` is kept. All files appear together or none (``clipprune.io.commit_together``).
One difference stays: open_clip cleans texts with ftfy and HTML unescaping before tokenizing, transformers'
CLIP tokenizer only normalises (NFC, whitespace, lower case), so texts with e.g. curly quotes or ``&amp;``
may get different ids.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from ..errors import ClipPruneError, ModelLoadError, OutputError
from ..io import atomic_path, commit_together

__all__ = ["openai_bpe_vocabulary", "write_hf_tokenizer_files", "main", "VOCAB_SIZE", "TOKENIZER_FILES"]

VOCAB_SIZE = 49408  # 2 × 256 byte symbols + 48894 merges + 2 specials
MERGES = VOCAB_SIZE - 2 * 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
PAD = END
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# any of these means the folder already has a tokenizer (the clipprune loader reads tokenizer.json first)
EXISTING_TOKENIZER_FILES = TOKENIZER_FILES + ("tokenizer.json",)
PREPROCESSOR_FILE = "preprocessor_config.json"
# end-of-text ids the text tower can pool at: 49407, or transformers' legacy 2 (pools at the largest id)
POOLING_EOS_IDS = (VOCAB_SIZE - 1, 2)
NOTE = ("hf_tokenizer_files: these files are only right for models trained with OpenAI's CLIP vocabulary "
        "(OpenAI CLIP, open_clip models with the default tokenizer)")


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte-to-unicode table, in its order: printable bytes map to themselves, the rest
    (control characters, space, ...) to code points from 256 upwards, so that BPE never sees whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def default_bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def openai_bpe_vocabulary(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges in rank order) of OpenAI's CLIP BPE, from open_clip's bundled merges file."""
    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable BPE merges file ({err})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + MERGES]]  # line 0 is a version header
    if len(merges) != MERGES or any(len(merge) != 2 for merge in merges):
        raise ModelLoadError(f"{path}: expected {MERGES} merge lines of two symbols after the header")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(merge) for merge in merges] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelLoadError(f"{path}: the merges give {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _clip_config(directory: Path):
    from transformers import CLIPConfig

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} not found: expected a folder written by CLIPModel.save_pretrained")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_file}: unreadable ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "clip":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ModelLoadError(f"{config_file}: model_type must be 'clip' (a transformers CLIPModel), got {found!r}")
    try:  # fills in what save_pretrained left out because it equals the default
        return CLIPConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises several types for a config it cannot build
        raise ModelLoadError(f"{config_file}: not a valid CLIPConfig ({' '.join(str(err).split())[:200]})") from None


def _tokenizer_config(context_length: int) -> dict:
    return {"tokenizer_class": "CLIPTokenizer", "bos_token": START, "eos_token": END, "unk_token": END,
            "pad_token": PAD, "model_max_length": context_length, "do_lower_case": True, "errors": "replace",
            "add_prefix_space": False, "clean_up_tokenization_spaces": False}


def _preprocessor_config(image_size: int) -> dict:
    from .hf_adapter import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    # CLIPImageProcessor: bicubic resize of the shortest side, centre crop, rescale to [0, 1], normalise
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(DEFAULT_IMAGE_MEAN), "image_std": list(DEFAULT_IMAGE_STD), "do_convert_rgb": True}


def write_hf_tokenizer_files(directory: str | Path, bpe_path: str | Path | None = None) -> list[Path]:
    """Write the tokenizer files (and preprocessor_config.json unless present) into ``directory``.

    Returns the paths written. ModelLoadError for a folder that is not a CLIP model with OpenAI's vocabulary
    size, OutputError if a tokenizer file is already there; in both cases nothing is written.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory (expected a folder written by CLIPModel.save_pretrained)")
    config = _clip_config(directory)
    text = config.text_config
    if text.vocab_size != VOCAB_SIZE:
        raise ModelLoadError(f"{directory / 'config.json'}: text_config.vocab_size is {text.vocab_size}, OpenAI's "
                             f"CLIP vocabulary has {VOCAB_SIZE} tokens: these tokenizer files would be wrong")
    if text.eos_token_id not in POOLING_EOS_IDS:
        raise ModelLoadError(f"{directory / 'config.json'}: text_config.eos_token_id is {text.eos_token_id}; with "
                             f"OpenAI's vocabulary the end-of-text id is {VOCAB_SIZE - 1} (or the legacy 2)")
    existing = [name for name in EXISTING_TOKENIZER_FILES if (directory / name).exists()]
    if existing:
        raise OutputError(f"{directory / existing[0]} already exists; not overwriting the tokenizer of "
                          f"{directory} (remove {', '.join(existing)} first to replace it)")
    vocab, merges = openai_bpe_vocabulary(bpe_path)
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(_tokenizer_config(int(text.max_position_embeddings)), indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": START, "eos_token": END, "unk_token": END,
                                               "pad_token": PAD}, indent=2) + "\n",
    }
    if not (directory / PREPROCESSOR_FILE).exists():
        contents[PREPROCESSOR_FILE] = json.dumps(_preprocessor_config(int(config.vision_config.image_size)),
                                                 indent=2) + "\n"
    written = []
    with commit_together():  # all files or, on any failure, none
        for name, text_content in contents.items():
            with atomic_path(directory / name) as tmp:
                tmp.write_text(text_content, encoding="utf-8")
            written.append(directory / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipprune.models.hf_tokenizer_files",
        description="Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and "
                    "preprocessor_config.json next to a CLIPModel saved with save_pretrained, from the BPE "
                    "vocabulary open_clip bundles. Only right for models trained with OpenAI's CLIP vocabulary.")
    parser.add_argument("directory", type=Path, help="folder with config.json and the weights")
    args = parser.parse_args(argv)
    print(NOTE, file=sys.stderr)
    try:
        written = write_hf_tokenizer_files(args.directory)
    except ClipPruneError as err:
        print(f"hf_tokenizer_files: error: {err}", file=sys.stderr)
        return 1
    kept = "" if any(p.name == PREPROCESSOR_FILE for p in written) else f" (kept the existing {PREPROCESSOR_FILE})"
    print(f"hf_tokenizer_files: wrote {', '.join(p.name for p in written)} in {args.directory}{kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
