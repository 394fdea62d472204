import pytest

from tests.model.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Qwen2 (untied, QKV bias) and a tiny Llama (tied embeddings), saved as HF directories."""
    root = tmp_path_factory.mktemp("models")
    return {f: str(save_tiny_model(f, root / f, seed=i)) for i, f in enumerate(("qwen2", "llama"))}
