"""Encoder-decoder models (models/seq2seq.py): causal decoder over a whole source, padding that changes
nothing, incremental decoding equal to teacher forcing, caches that join and shrink, tied embeddings,
and a tiny model that learns to reverse sequences."""

import pytest
import torch

from lmlab.config import ModelConfig, load_config
from lmlab.errors import ConfigError
from lmlab.models.interface import IGNORE_INDEX, count_parameters
from lmlab.models.registry import build_model

VOCAB = 13
SMALL = dict(n_layer=2, d_model=32, block_size=12, vocab_size=VOCAB)
CONFIGS = {
    "gpt2": ModelConfig(family="seq2seq", preset="gpt2", n_head=4, **SMALL),
    "llama": ModelConfig(family="seq2seq", preset="llama", n_head=4, n_kv_head=2, n_dec_layer=3, **SMALL),
    "bert": ModelConfig(family="seq2seq", encoder_preset="bert", n_head=4, n_dec_head=2, n_dec_layer=1,
                        mlp="gelu_exact", **SMALL),
    "lstm-luong": ModelConfig(family="rnn_seq2seq", cell="lstm", attention="luong", **SMALL),
    "gru-bahdanau": ModelConfig(family="rnn_seq2seq", cell="gru", attention="bahdanau", d_ff=24, **SMALL),
}


def model_of(name: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    return build_model(ModelConfig(**{**cfg.__dict__, **changes})).eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch():
    """Three sources of lengths 7, 4 and 6, padded on the right, and their mask."""
    src, mask = ids(3, 7), torch.ones(3, 7, dtype=torch.long)
    for row, length in enumerate((7, 4, 6)):
        src[row, length:], mask[row, length:] = 0, 0
    return src, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_the_decoder_is_causal_and_every_target_position_sees_the_whole_source(name):
    model = model_of(name)
    src, mask = padded_batch()
    tgt = ids(3, 6, seed=1)
    with torch.no_grad():
        logits, _ = model(src, tgt, mask)
        later = tgt.clone()
        later[:, 4] = (later[:, 4] + 1) % VOCAB
        changed_target, _ = model(src, later, mask)
        other_source = src.clone()
        other_source[0, 6] = (other_source[0, 6] + 1) % VOCAB  # the last real token of row 0
        changed_source, _ = model(other_source, tgt, mask)
    assert logits.shape == (3, 6, VOCAB)
    assert torch.allclose(changed_target[:, :4], logits[:, :4], atol=1e-6)  # position i sees tokens 0..i
    assert (changed_target[:, 4:] - logits[:, 4:]).abs().amax(dim=-1).min() > 1e-6
    assert (changed_source[0] - logits[0]).abs().amax(dim=-1).min() > 1e-6  # every position, the first too
    assert torch.allclose(changed_source[1:], logits[1:], atol=1e-6)  # other rows untouched


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_the_source_changes_nothing(name):
    model = model_of(name)
    src, mask = padded_batch()
    tgt = ids(3, 5, seed=1)
    wider_src = torch.cat([src, ids(3, 3, seed=2)], dim=1)  # extra columns of junk, masked out
    wider_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits, _ = model(src, tgt, mask)
        wider, _ = model(wider_src, tgt, wider_mask)
        alone, _ = model(src[1:2, :4], tgt[1:2])  # row 1 without any padding at all
    assert torch.allclose(wider, logits, atol=1e-5)
    assert torch.allclose(alone[0], logits[1], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_equals_teacher_forcing_token_for_token(name):
    model = model_of(name)
    src, mask = padded_batch()
    tgt = ids(3, 8, seed=3)
    with torch.no_grad():
        full, _ = model(src, tgt, mask)
        cache = model.make_cache(model.encode(src, mask), mask, max_len=8)
        steps = [model.decode(tgt[:, i:i + 1], cache) for i in range(8)]
        chunked_cache = model.make_cache(model.encode(src, mask), mask, max_len=8)
        chunks = [model.decode(tgt[:, :3], chunked_cache), model.decode(tgt[:, 3:], chunked_cache)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    assert torch.equal(torch.cat(steps, dim=1).argmax(-1), full.argmax(-1))
    assert cache.pos == 8


@pytest.mark.parametrize("name", CONFIGS)
def test_caches_that_join_and_shrink_decode_each_row_as_alone(name):
    """A batch that is two steps in, joined by new sources (other lengths), then left by its first row:
    every row's logits are those of teacher forcing on that row alone."""
    model = model_of(name)
    first, first_mask = padded_batch()
    tgt = ids(3, 6, seed=4)
    second = ids(2, 9, seed=5)
    second_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    second_tgt = ids(2, 4, seed=6)
    with torch.no_grad():
        cache = model.make_cache(model.encode(first, first_mask), first_mask, max_len=2)
        model.decode(tgt[:, :2], cache)
        joining = model.make_cache(model.encode(second, second_mask), second_mask, max_len=1)
        model.decode(second_tgt[:, :1], joining)
        cache = cache.join(joining, max_len=2 + 3)
        steps = [model.decode(torch.cat([tgt[:, 2 + i:3 + i], second_tgt[:, 1 + i:2 + i]]), cache) for i in range(2)]
        cache.shrink(torch.tensor([1, 2, 3, 4]), room=1)
        steps.append(model.decode(torch.cat([tgt[1:, 4:5], second_tgt[:, 3:4]]), cache))
        alone = [model(first[r:r + 1, :int(first_mask[r].sum())], tgt[r:r + 1, :5])[0][0] for r in range(3)]
        alone += [model(second[r:r + 1, :int(second_mask[r].sum())], second_tgt[r:r + 1])[0][0] for r in range(2)]
    for row in range(5):
        got = [steps[0][row, 0], steps[1][row, 0]]
        if row > 0:
            got.append(steps[2][row - 1, 0])
        want = alone[row][2:5] if row < 3 else alone[row][1:4]
        assert torch.allclose(torch.stack(got), want[:len(got)], atol=1e-5), row


@pytest.mark.parametrize("name", ["gpt2", "gru-bahdanau"])
def test_tied_embeddings_share_one_tensor(name):
    tied, untied = model_of(name, tie_embeddings=True), model_of(name, tie_embeddings=False)
    head = tied.lm_head if hasattr(tied, "lm_head") else tied.head
    assert tied.src_emb.weight is tied.tgt_emb.weight is head.weight
    assert tied.src_emb.weight.data_ptr() == head.weight.data_ptr()
    shared = VOCAB * tied.config.d_model
    assert count_parameters(untied)[1] - count_parameters(tied)[1] == 2 * shared
    untied_head = untied.lm_head if hasattr(untied, "lm_head") else untied.head
    assert untied.src_emb.weight is not untied.tgt_emb.weight and untied.tgt_emb.weight is not untied_head.weight


def test_the_config_knows_the_new_families_and_refuses_their_fields_elsewhere(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {family: rnn_seq2seq, cell: gru, attention: bahdanau, n_dec_layer: 3}\n")
    cfg = load_config(path).model
    assert (cfg.family, cfg.cell, cfg.attention, cfg.n_dec_layer) == ("rnn_seq2seq", "gru", "bahdanau", 3)
    for line, word in [("{family: gpt, cell: lstm}", "cell"), ("{family: seq2seq, attention: luong}", "attention"),
                       ("{family: seq2seq, preset: bert}", "preset"), ("{family: rnn_seq2seq, n_head: 2}", "n_head")]:
        path.write_text(f"model: {line}\n")
        with pytest.raises(ConfigError, match=word):
            load_config(path)


def test_a_source_or_target_longer_than_block_size_is_refused():
    model = model_of("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, 13), ids(1, 3))
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, 3), ids(1, 13))


def reversal_batch(generator: torch.Generator, batch: int = 32, eot: int = 0):
    """Sources of 2-5 tokens (ids 1..VOCAB-1) padded on the right; targets are the sources reversed."""
    lengths = torch.randint(2, 6, (batch,), generator=generator)
    src = torch.zeros(batch, 5, dtype=torch.long)
    tgt_in = torch.zeros(batch, 6, dtype=torch.long)  # [eot] + reversed
    targets = torch.full((batch, 6), IGNORE_INDEX)  # reversed + [eot]
    for row, n in enumerate(lengths.tolist()):
        tokens = torch.randint(1, VOCAB, (n,), generator=generator)
        src[row, :n] = tokens
        tgt_in[row, 1:n + 1] = tokens.flip(0)
        targets[row, :n] = tokens.flip(0)
        targets[row, n] = eot
    return src, src != 0, tgt_in, targets


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and several threads crawl on a shared, busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,steps,lr", [("gpt2", 400, 3e-3), ("lstm-luong", 300, 1e-2)])
def test_a_tiny_model_learns_to_reverse_short_sequences(name, steps, lr, one_thread):
    """A plain optimizer loop: teacher forcing with shifted targets, then greedy decoding from the start
    token through the cache reverses unseen sources (the whole thing learns, end to end; ~5 s each)."""
    model = model_of(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        src, mask, tgt_in, targets = reversal_batch(generator)
        _, loss = model(src, tgt_in, mask, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    src, mask, _, targets = reversal_batch(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        cache = model.make_cache(model.encode(src, mask), mask, max_len=6)
        token, out = torch.zeros(64, 1, dtype=torch.long), []
        for _ in range(6):
            token = model.decode(token, cache)[:, -1].argmax(-1, keepdim=True)
            out.append(token)
    out = torch.cat(out, dim=1)
    correct = [(out[r] == targets[r])[targets[r] != IGNORE_INDEX].all() for r in range(64)]
    assert loss.item() < 0.3
    assert sum(map(bool, correct)) >= 58  # >= 90% of unseen sources reversed exactly, end token included


@pytest.mark.parametrize("name", ["gpt2", "bert", "gru-bahdanau"])
def test_a_checkpoint_of_an_encoder_decoder_loads_back_the_same_model(name, tmp_path):
    """The checkpoint format holds the new families as they are: config filled, tied weights stored once."""
    from lmlab.data.tokenizer import train_tokenizer
    from lmlab.train.checkpoint import load_checkpoint, save_checkpoint

    tok = train_tokenizer("char", ["abc"])
    model = model_of(name, vocab_size=tok.vocab_size, tie_embeddings=True)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded = load_checkpoint(tmp_path / "ckpt").model.eval()
    src, tgt = ids(2, 5), ids(2, 4, seed=1)
    assert loaded.config == model.config and type(loaded) is type(model)
    assert torch.equal(loaded(src, tgt)[0], model(src, tgt)[0])
    assert getattr(loaded, "source_embedding", loaded.src_emb).weight is loaded.tgt_emb.weight
