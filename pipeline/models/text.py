"""Text handed to a tokenizer, bounded: a caption scraped from the web (or a query) can be a megabyte, and BPE cost
grows with the square of a word's length; the leading tokens any CLIP tokenizer keeps are unchanged."""

from __future__ import annotations

# Caption text beyond this many characters cannot change the first 77 tokens in practice; cutting it
# keeps a 1 MB caption from costing seconds of BPE.
MAX_CAPTION_CHARS = 20_000
# BPE cost grows with the square of a word's length; no tokenizer keeps more than ~1,000 words anyway.
MAX_WORD_CHARS = 256
MAX_CAPTION_WORDS = 1024


def caption_for_tokenizer(text: str) -> str:
    """Bound the tokenizer's work without changing the leading tokens it keeps."""
    if len(text) <= MAX_WORD_CHARS:
        return text
    words = text[:MAX_CAPTION_CHARS].split()[:MAX_CAPTION_WORDS]
    return " ".join(w[:MAX_WORD_CHARS] for w in words)
