"""Built-in corpus, deterministic shards, held-out split, and the shared initial model."""

import numpy as np
import pytest
import torch

from node.train.data import BLOCK_BYTES, Corpus, DataError, ShardSampler, heldout_batches, load_corpus
from node.train.model import ModelConfig, build_model


def test_builtin_corpus_is_real_text_and_reproducible(corpus):
    assert len(corpus.data) > 2_000_000
    assert b"def " in corpus.data[:200_000].tobytes()
    assert load_corpus().fingerprint == corpus.fingerprint


def test_shards_partition_the_train_split_and_exclude_heldout(corpus):
    shards = [set(corpus.train_blocks(i, 3)) for i in range(3)]
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    assert not (set().union(*shards) & set(corpus.heldout_blocks()))
    assert len(set().union(*shards)) + len(corpus.heldout_blocks()) == corpus.num_blocks


def test_sampler_draws_only_from_its_shard_and_resumes_exactly():
    # every byte of block b is b: a window's bytes name the block it came from
    labelled = Corpus(np.repeat(np.arange(100, dtype=np.uint8), BLOCK_BYTES), "test", "test")
    sampler = ShardSampler(labelled, 1, 3, 32, 4, seed=9)
    allowed = set(labelled.train_blocks(1, 3))
    state = sampler.state_dict()
    first = [sampler.next_batch()[0] for _ in range(20)]
    sampler.load_state_dict(state)
    again = [sampler.next_batch()[0] for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    seen = {int(v) for batch in first for v in batch.flatten()}
    assert seen <= allowed and len(seen) > 5


def test_heldout_set_is_identical_everywhere(corpus):
    a = heldout_batches(corpus, 32, 4, 2)
    b = heldout_batches(corpus, 32, 4, 2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert torch.equal(a[0][0][:, 1:], a[0][1][:, :-1])  # targets are inputs shifted by one byte


def test_user_data_files_and_refusals(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello world\n" * 200_000)
    corpus = load_corpus([str(folder)])
    assert corpus.description == str(folder) and len(corpus.data) == 2_400_000
    with pytest.raises(DataError, match="does not exist"):
        load_corpus([str(tmp_path / "missing")])
    (tmp_path / "tiny.txt").write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="need at least"):
        load_corpus([str(tmp_path / "tiny.txt")])


def test_same_seed_same_initial_model_and_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(d_model=32, n_heads=2), seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # building a model does not disturb the caller's RNG
    b = build_model(ModelConfig(d_model=32, n_heads=2), seed=5)
    c = build_model(ModelConfig(d_model=32, n_heads=2), seed=6)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_untrained_model_predicts_uniform_bytes():
    model = build_model(ModelConfig(d_model=32, n_heads=2, context=16), seed=0)
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert abs(model.loss(tokens[:, :-1], tokens[:, 1:]).item() - np.log(256)) < 0.1
