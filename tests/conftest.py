"""Shared fixtures. Heavy objects (the real SmolLM2 weights) load once per test session."""

from pathlib import Path

import pytest
import torch

from atmanrl import dist

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_test_path() -> Path:
    """`../shared/data/gsm8k/test.jsonl`; tests that need it skip cleanly when it is absent."""
    path = GSM8K_DIR / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K test split not found at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default SmolLM2-135M-Instruct, float32, eval mode, loaded once."""
    from atmanrl.model import load

    model, tokenizer = load("smollm2-135m-instruct", dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


@pytest.fixture
def single_process_one_thread():
    """No leftover process group; one intra-op thread (tiny matmuls only lose from threads on a busy machine)."""
    dist.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    dist.shutdown()


@pytest.fixture
def read_only_tmp(tmp_path, monkeypatch):
    """``tmp_path`` as a read-only file system for ``Path.write_text`` (EROFS on every file under it)."""
    import errno

    real = Path.write_text

    def read_only(self, *a, **k):
        if tmp_path in self.parents:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", read_only)
    return tmp_path
