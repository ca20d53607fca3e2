import pytest
import torch

# The unit tests use tiny tensors, where a second intra-op thread costs more in synchronisation than it
# gains (and the reference machine has only two cores): one thread keeps them fast and predictable.
torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    from minillm.model import GPTConfig

    return GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    from minillm.model import GPT

    torch.manual_seed(0)
    return GPT(tiny_config).eval()
