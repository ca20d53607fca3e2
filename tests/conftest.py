import os

import pytest
import torch

# Two cores on the reference machine: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_config():
    from minillm.model import GPTConfig

    return GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    from minillm.model import GPT

    torch.manual_seed(0)
    return GPT(tiny_config).eval()
