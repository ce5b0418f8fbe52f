"""Seq2SeqTransformer equals nn.Transformer given the same weights; greedy decoding is exact and learns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_core.seq2seq import DecoderCache, Seq2SeqConfig, Seq2SeqTransformer
from tests.model_core.utils import pads, torch_causal, torch_to_ours

TOL = 1e-5
PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides: object) -> Seq2SeqConfig:
    base: dict[str, object] = dict(
        src_vocab_size=17,
        tgt_vocab_size=19,
        d_model=32,
        n_heads=4,
        d_ff=48,
        n_encoder_layers=2,
        n_decoder_layers=3,
        dropout=0.1,
        max_len=64,
    )
    base.update(overrides)
    return Seq2SeqConfig(**base)  # type: ignore[arg-type]


def reference_positions(T: int, d: int) -> torch.Tensor:
    """Sinusoidal positions written independently: angle p / 10000^(2*floor(j/2)/d), sin even, cos odd."""
    p = torch.arange(T, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    j = torch.arange(d).unsqueeze(0)  # (1, d)
    angle = p / torch.pow(10000.0, (2 * (j // 2)).double() / d)  # (T, d)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


def torch_twin(cfg: Seq2SeqConfig, seed: int) -> tuple[nn.Transformer, Seq2SeqTransformer]:
    """An nn.Transformer with random non-trivial weights and our model holding the same weights."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True"
        warnings.simplefilter("ignore", UserWarning)
        ref = nn.Transformer(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_encoder_layers,
            cfg.n_decoder_layers,
            cfg.d_ff,
            dropout=cfg.dropout,
            activation=cfg.activation,
            batch_first=True,
            norm_first=cfg.norm_first,
            layer_norm_eps=cfg.eps,
        ).eval()
    for p in ref.parameters():
        nn.init.normal_(p, std=0.2)
    ours = Seq2SeqTransformer(cfg).eval()
    result = ours.load_state_dict(torch_to_ours(ref.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) <= {"src_embed.weight", "tgt_embed.weight", "lm_head.weight"}
    return ref, ours


@pytest.mark.parametrize("norm_first", [False, True])
def test_body_matches_nn_transformer(norm_first: bool) -> None:
    cfg = tiny_config(norm_first=norm_first, activation="gelu" if norm_first else "relu")
    ref, ours = torch_twin(cfg, seed=0)
    S, T = 9, 7
    src, tgt = torch.randn(3, S, cfg.d_model), torch.randn(3, T, cfg.d_model)
    src_pad, tgt_pad = pads([9, 5, 3], S), pads([7, 7, 4], T)
    expected = ref(
        src,
        tgt,
        tgt_mask=torch_causal(T),
        tgt_is_causal=True,
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    memory = ours.encoder(src, src_key_padding_mask=src_pad)
    got = ours.decoder(tgt, memory, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("share,tie", [(False, False), (False, True), (True, True)])
def test_logits_match_nn_transformer_with_reproduced_embeddings(share: bool, tie: bool) -> None:
    vocab = 23
    cfg = tiny_config(src_vocab_size=vocab, tgt_vocab_size=vocab, share_embeddings=share, tie_output=tie)
    ref, ours = torch_twin(cfg, seed=1)
    assert (ours.src_embed is ours.tgt_embed) == share
    assert (ours.lm_head.weight is ours.tgt_embed.weight) == tie
    gen = torch.Generator().manual_seed(2)
    S, T = 8, 6
    src, tgt = torch.randint(3, vocab, (2, S), generator=gen), torch.randint(3, vocab, (2, T), generator=gen)
    src_pad, tgt_pad = pads([8, 5], S), pads([6, 4], T)
    src, tgt = src.masked_fill(src_pad, PAD), tgt.masked_fill(tgt_pad, PAD)

    scale = math.sqrt(cfg.d_model)
    src_x = F.embedding(src, ours.src_embed.weight) * scale + reference_positions(S, cfg.d_model)
    tgt_x = F.embedding(tgt, ours.tgt_embed.weight) * scale + reference_positions(T, cfg.d_model)
    h = ref(
        src_x,
        tgt_x,
        tgt_mask=torch_causal(T),
        tgt_is_causal=True,
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    expected = h @ ours.lm_head.weight.T  # (B, T, V)
    got = ours(src, tgt, src_pad_mask=src_pad, tgt_pad_mask=tgt_pad)
    assert got.shape == (2, T, vocab)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_cached_decode_equals_full_decode() -> None:
    torch.manual_seed(3)
    model = Seq2SeqTransformer(tiny_config()).eval()
    src = torch.randint(3, 17, (2, 6))
    tgt = torch.randint(3, 19, (2, 7))
    src_pad = pads([6, 4], 6)
    with torch.no_grad():
        memory = model.encode(src, src_pad)
        full = model.decode(tgt, memory, memory_pad_mask=src_pad)  # (B, T, V)
        cache = DecoderCache()
        steps = [model.decode(tgt[:, :3], memory, memory_pad_mask=src_pad, cache=cache)]  # a 3-token prefill
        for t in range(3, 7):
            steps.append(model.decode(tgt[:, t : t + 1], memory, memory_pad_mask=src_pad, cache=cache))
    assert cache.seq_len == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)


def stepwise_reference(model: Seq2SeqTransformer, src: torch.Tensor, max_len: int) -> list[int]:
    """One unpadded source (1, S): argmax of full forward passes over the growing prefix."""
    ys = [BOS]
    with torch.no_grad():
        for _ in range(max_len):
            nxt = int(model(src, torch.tensor([ys]))[0, -1].argmax())
            ys.append(nxt)
            if nxt == EOS:
                break
    return ys[1:]


def assert_greedy_matches_stepwise(
    model: Seq2SeqTransformer, src: torch.Tensor, lengths: list[int], max_len: int
) -> torch.Tensor:
    src_pad = pads(lengths, src.shape[1])
    out = model.greedy_decode(src.masked_fill(src_pad, PAD), BOS, EOS, max_len, src_pad_mask=src_pad)
    # the recomputing path, given junk (not PAD) under the padding: masked keys must not matter
    recomputed = model.greedy_decode(src, BOS, EOS, max_len, src_pad_mask=src_pad, use_cache=False)
    assert torch.equal(out, recomputed)
    assert out.shape[0] == src.shape[0] and out.shape[1] <= max_len
    for i, n in enumerate(lengths):
        expected = stepwise_reference(model, src[i : i + 1, :n], max_len)
        row = out[i].tolist()
        assert row[: len(expected)] == expected
        assert all(t == model.config.pad_id for t in row[len(expected) :])
    return out


def test_greedy_decode_equals_stepwise_argmax_random_model() -> None:
    torch.manual_seed(4)
    model = Seq2SeqTransformer(tiny_config(tgt_vocab_size=8, pad_id=7)).eval()
    src = torch.randint(3, 17, (4, 7))
    out = assert_greedy_matches_stepwise(model, src, [7, 3, 5, 1], max_len=12)
    assert out.shape[1] == 12 or bool((out == EOS).any(dim=1).all())


def test_config_validation_and_max_len() -> None:
    with pytest.raises(ValueError):
        tiny_config(d_model=30)
    with pytest.raises(ValueError):
        tiny_config(share_embeddings=True)  # 17 != 19
    model = Seq2SeqTransformer(tiny_config(max_len=8))
    with pytest.raises(ValueError):
        model.encode(torch.zeros(1, 9, dtype=torch.long))


def reverse_batch(n: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources of 2..6 content tokens (ids >= 3), right-padded; targets BOS + reversed + EOS, padded."""
    lengths = torch.randint(2, 7, (n,), generator=gen)
    S = int(lengths.max())
    src_pad = torch.arange(S).unsqueeze(0) >= lengths.unsqueeze(1)  # (n, S)
    src = torch.randint(3, vocab, (n, S), generator=gen).masked_fill(src_pad, PAD)
    tgt = torch.full((n, S + 2), PAD)
    for i, L in enumerate(lengths.tolist()):
        tgt[i, 0], tgt[i, L + 1] = BOS, EOS
        tgt[i, 1 : L + 1] = src[i, :L].flip(0)
    return src, src_pad, tgt


def test_tiny_seq2seq_learns_to_reverse() -> None:
    """A few hundred Adam steps teach a tiny post-norm model to reverse variable-length, padded inputs."""
    torch.manual_seed(0)
    vocab = 12
    cfg = Seq2SeqConfig(
        vocab,
        vocab,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        max_len=16,
        share_embeddings=True,
    )
    model = Seq2SeqTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        src, src_pad, tgt = reverse_batch(64, vocab, gen)
        inp, target = tgt[:, :-1], tgt[:, 1:]
        logits = model(src, inp, src_pad_mask=src_pad, tgt_pad_mask=inp.eq(PAD))
        loss = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    model.eval()
    src, src_pad, tgt = reverse_batch(100, vocab, torch.Generator().manual_seed(99))
    out = model.greedy_decode(src, BOS, EOS, max_len=10, src_pad_mask=src_pad)
    correct = 0
    for i in range(100):
        want = tgt[i, 1:][tgt[i, 1:] != PAD].tolist()  # reversed tokens + EOS
        correct += out[i, : len(want)].tolist() == want
    assert correct >= 90, f"only {correct}/100 reversed exactly"
    lengths = (~src_pad[:8]).sum(1).tolist()
    assert_greedy_matches_stepwise(model, src[:8], lengths, max_len=10)
