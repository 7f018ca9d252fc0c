"""Session fixtures: the tiny model directories every test shares (built once per run)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peftcli import tiny  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _model(models_dir, arch: str) -> str:
    return tiny.build(arch, str(models_dir / arch))


@pytest.fixture(scope="session")
def tiny_llama(models_dir) -> str:
    return _model(models_dir, "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(models_dir) -> str:
    return _model(models_dir, "llama-tied")


@pytest.fixture(scope="session")
def tiny_bert(models_dir) -> str:
    return _model(models_dir, "bert")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir) -> str:
    return _model(models_dir, "gpt2")


@pytest.fixture(scope="session", params=["llama", "bert", "gpt2", "llama-tied"])
def any_model(request, tiny_llama, tiny_bert, tiny_gpt2, tiny_llama_tied) -> str:
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2, "llama-tied": tiny_llama_tied}[request.param]
