"""Text encoders: the byte-level `tiny` one trained from scratch, and a CLIP text encoder from a
local folder (a tiny CLIPTextModel built here from a config, random weights, and a byte-level
BPE tokenizer written here) whose embeddings are computed once and read from the cache after."""

from __future__ import annotations

import pytest
import torch

from paceray.base.errors import PacerayError
from trainables.diffusion import text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's reversible map of bytes to printable characters (the BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip(folder) -> None:
    """A CLIPTextModel of 2 layers, width 32, random weights, and a CLIP tokenizer with no merges
    (every byte its own token), saved as from_pretrained reads them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + len(chars) for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=text.MAX_TOKENS,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_byte_tokenizer_keeps_every_byte_between_bos_and_eos():
    ids, mask = text.ByteTokenizer(max_length=8)(["ab", "é", "a long caption cut short"])
    assert ids[0].tolist() == [1, ord("a") + 3, ord("b") + 3, 2, 0, 0, 0, 0]
    assert ids[1, :4].tolist() == [1, 0xC3 + 3, 0xA9 + 3, 2]  # é is two UTF-8 bytes
    assert ids[2, -1].item() == 2 and bool(mask[2].all())  # cut to fit, EOS kept
    assert mask[0].tolist() == [True] * 4 + [False] * 4


def test_the_tiny_encoder_tells_captions_apart_and_learns():
    torch.manual_seed(0)
    encoder = text.TinyTextEncoder(dim=32, layers=2, heads=4, max_length=24)
    hidden, mask = encoder.encode(["a photo of a sneaker", "a photo of a sandal"])
    assert hidden.shape == (2, 24, 32) and mask.shape == (2, 24)
    assert not torch.allclose(hidden[0, mask[0]].mean(0), hidden[1, mask[1]].mean(0))
    # padding does not leak into real tokens: the same caption in a longer batch encodes alike
    alone, _ = encoder.encode(["a photo of a sneaker"])
    torch.testing.assert_close(alone[0, mask[0]], hidden[0, mask[0]], rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)  # trained jointly: gradients reach it
    loss = encoder.encode(["a photo of a sneaker"])[0].pow(2).mean()
    loss.backward()
    optimizer.step()
    assert encoder.encode(["a photo of a sneaker"])[0].pow(2).mean() < loss


def test_clip_embeddings_are_computed_once_then_read_from_the_cache(tmp_path):
    folder = tmp_path / "clip"
    write_tiny_clip(folder)
    captions = ["a photo of a sneaker", "the number 3", "a photo of a sneaker"]
    first = text.clip_embeddings(folder, captions, "captionskey", tmp_path / "storage")
    assert not first.cached and first.path.is_file() and first.path.parent == tmp_path / "storage" / "text-embeddings"
    assert first.hidden.shape == (2, text.MAX_TOKENS, 32)  # two distinct texts, each encoded once
    assert first.index.tolist() == [0, 1, 0]
    written = first.path.stat().st_mtime_ns
    second = text.clip_embeddings(folder, captions, "captionskey", tmp_path / "storage")
    assert second.cached and second.path == first.path and first.path.stat().st_mtime_ns == written
    torch.testing.assert_close(second.hidden, first.hidden)
    # what the encoder gives, to fp16's precision
    model, tokenizer = text.load_clip(folder)
    batch = tokenizer(["the number 3"], padding="max_length", max_length=text.MAX_TOKENS, truncation=True,
                      return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state[0]
    torch.testing.assert_close(first.hidden[1], expected, rtol=1e-2, atol=2e-3)
    hidden, mask = second.of(torch.tensor([2, 1]))
    torch.testing.assert_close(hidden, first.hidden[[0, 1]])
    # another encoder (any file of its folder differs) never reads this cache
    other = tmp_path / "clip2"
    write_tiny_clip(other)
    (other / "extra.txt").write_text("changes the digest")
    assert not text.clip_embeddings(other, captions, "captionskey", tmp_path / "storage").cached


def test_a_folder_without_clip_weights_says_where_to_put_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PacerayError) as caught:
        text.clip_embeddings(tmp_path / "empty", ["x"], "k", tmp_path / "storage")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "empty") in message
    assert "config.json and model.safetensors of a CLIPTextModel" in message and "save_pretrained(PATH)" in message


def test_a_text_conditioned_unet_reads_the_caption_and_trains_its_tiny_encoder():
    """The tiny text preset's UNet2DConditionModel on 8x8 with the tiny encoder: ε of the right
    shape, another caption gives another ε, padding is masked (a caption alone or in a longer
    batch predicts alike), and the loss's gradient reaches the encoder (they train jointly)."""
    from trainables.diffusion.model import build_text_model

    torch.manual_seed(0)
    encoder = text.TinyTextEncoder(dim=32, layers=1, heads=4, max_length=24)
    unet = build_text_model("tiny", 8, 1, cross_attention_dim=32)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    hidden, mask = encoder.encode(["the number 3", "the number 8, written large"])
    eps = unet(x, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
    assert eps.shape == x.shape
    other, other_mask = encoder.encode(["the number 8, written large", "the number 3"])
    swapped = unet(x, t, encoder_hidden_states=other, encoder_attention_mask=other_mask).sample
    assert not torch.allclose(eps, swapped, atol=1e-4)
    alone, alone_mask = encoder.encode(["the number 3"])
    eps_alone = unet(x[:1], t[:1], encoder_hidden_states=alone, encoder_attention_mask=alone_mask).sample
    torch.testing.assert_close(eps_alone, eps[:1], rtol=1e-4, atol=1e-5)
    eps.pow(2).mean().backward()
    assert encoder.embed.weight.grad is not None and float(encoder.embed.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="multiple of 2"):
        build_text_model("tiny", 7, 1, cross_attention_dim=32)
