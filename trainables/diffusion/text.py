"""Text encoders for text-conditioned denoisers, and the caption embeddings of a frozen one.

Two kinds:
- `tiny`: a small transformer encoder over UTF-8 bytes (`ByteTokenizer`: no vocabulary, nothing
  to download), trained jointly with the denoiser from scratch.
- a folder holding a pretrained CLIP text encoder (transformers' `CLIPTextModel` with its
  tokenizer files), frozen. Its embeddings of a caption set are computed once and cached in the
  storage root, keyed by the encoder's digest (every file of the folder) and the captions' key
  (trainables/diffusion/captions.py), like the FID reference statistics: the next trial reads them.

transformers is an extra (`pip install -e '.[text]'`, in `dev` too), imported only by the CLIP
path; nothing here is imported by a config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from paceray.protocol import PacerayError, one_line, write_atomic

MAX_TOKENS = 77  # CLIP's context length; the byte tokenizer cuts captions to it as well
EMBEDDINGS_DIR = "text-embeddings"
CLIP_FILES_HINT = ("config.json and model.safetensors of a CLIPTextModel with its tokenizer files (vocab.json, "
                   "merges.txt): where a network exists, CLIPTextModel.from_pretrained(NAME).save_pretrained(PATH) "
                   "and CLIPTokenizer.from_pretrained(NAME).save_pretrained(PATH)")


class ByteTokenizer:
    """A caption as its UTF-8 bytes (ids 3..258) between BOS (1) and EOS (2), padded with 0."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET

    def __init__(self, max_length: int = MAX_TOKENS):
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, max_length) and the mask of real tokens (B, max_length)."""
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [b + self.OFFSET for b in text.encode("utf-8")[: self.max_length - 2]]
            tokens = [self.BOS, *body, self.EOS]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.PAD


class TinyTextEncoder(nn.Module):
    """Byte embeddings plus learned positions through a few pre-norm transformer layers; its
    hidden states (B, L, dim) are what the UNet's cross-attention reads. Trained with the UNet."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_length: int = MAX_TOKENS):
        super().__init__()
        self.tokenizer = ByteTokenizer(max_length)
        self.embed = nn.Embedding(ByteTokenizer.vocab_size, dim, padding_idx=ByteTokenizer.PAD)
        self.position = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        return self.norm(self.layers(x, src_key_padding_mask=~mask))

    def encode(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts)
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask


# --- a pretrained CLIP text encoder, frozen, its embeddings cached ---------------------------

def encoder_digest(folder: str | Path) -> str:
    """sha256 over every file of the encoder's folder (path and content): another encoder, or the
    same one retrained, never reads this one's cached embeddings."""
    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def load_clip(folder: str | Path):
    """(CLIPTextModel in eval mode, frozen; its tokenizer) from a local folder, or one line saying
    what the folder must hold."""
    folder = Path(folder).expanduser().resolve()
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (folder / "config.json").is_file() or not weights:
        raise PacerayError(f"text encoder {folder}: no CLIP text encoder there; put {CLIP_FILES_HINT}")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise PacerayError("a CLIP text encoder needs transformers: pip install -e '.[text]'") from None
    try:
        model = CLIPTextModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise PacerayError(one_line(f"text encoder {folder}: cannot load it ({e}); put {CLIP_FILES_HINT}")) from None
    model.eval().requires_grad_(False)
    return model, tokenizer


@dataclass(frozen=True)
class TextEmbeddings:
    """A caption set's embeddings by distinct text: `hidden` (U, L, D) and `mask` (U, L) of the
    distinct texts, `index` (N,) the distinct text of each caption; `cached`: read from the cache."""

    hidden: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    path: Path
    cached: bool

    def of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states and masks of caption rows `rows`."""
        distinct = self.index[rows]
        return self.hidden[distinct], self.mask[distinct]


def clip_embeddings(folder: str | Path, texts: list[str], captions_key: str, storage: str | Path,
                    batch_size: int = 256) -> TextEmbeddings:
    """The frozen CLIP encoder's last hidden states of `texts` (a caption set, `captions_key`),
    computed once per encoder and caption set, kept in `{storage}/text-embeddings/`. Distinct
    texts are encoded once (templated captions are a few dozen)."""
    distinct = list(dict.fromkeys(texts))
    position = {text: i for i, text in enumerate(distinct)}
    index = torch.tensor([position[t] for t in texts], dtype=torch.long)
    path = Path(storage) / EMBEDDINGS_DIR / f"{encoder_digest(folder)[:16]}-{captions_key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["texts"] == distinct:
            return TextEmbeddings(saved["hidden"].float(), saved["mask"], index, path, cached=True)
    model, tokenizer = load_clip(folder)
    hidden, masks = [], []
    with torch.no_grad():
        for start in range(0, len(distinct), batch_size):
            batch = tokenizer(distinct[start:start + batch_size], padding="max_length", truncation=True,
                              max_length=min(MAX_TOKENS, model.config.max_position_embeddings), return_tensors="pt")
            hidden.append(model(**batch).last_hidden_state.to(torch.float16))
            masks.append(batch["attention_mask"].bool())
    saved = {"texts": distinct, "hidden": torch.cat(hidden), "mask": torch.cat(masks)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(saved, tmp))
    return TextEmbeddings(saved["hidden"].float(), saved["mask"], index, path, cached=False)
