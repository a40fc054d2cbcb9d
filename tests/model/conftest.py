import pytest
from tiny_encoder import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random BERT (hidden 32) with MiniLM's tokenizer, saved once per test module."""
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))
