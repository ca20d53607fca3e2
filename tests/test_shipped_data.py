"""The data shipped in data/ is what the commands regenerate (so nobody trains on stale files)."""
from pathlib import Path

from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_tokenizer_is_trained_on_the_shipped_corpus():
    from minillm.config import get_preset

    shipped = Tokenizer.load(ROOT / "data" / "tokenizer")
    fresh = Tokenizer.train(ROOT / "data" / "world" / "corpus_train.txt", get_preset("cpu").vocab_size)
    assert shipped.vocab == fresh.vocab and shipped.merges == fresh.merges


def test_shipped_world_is_seed_0(tmp_path):
    from minillm.world import write_world

    write_world(0, tmp_path)
    for f in sorted((ROOT / "data" / "world").iterdir()):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f"data/world/{f.name} is stale"
