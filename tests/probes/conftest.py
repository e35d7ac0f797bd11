"""Fixtures for the probe tests: a tiny tokenizer trained here on the probe texts, and a tiny random
Llama saved with it to a folder that ``--model PATH`` loads (no hub, no network)."""
import pytest

from probe_fixtures import make_model_dir, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    """A folder holding the tiny random Llama and its tokenizer."""
    return make_model_dir(tokenizer, tmp_path_factory.mktemp("tiny-llama"))
