"""Where generated data and converted weights live (speechlm/cache.py)."""

from __future__ import annotations

from speechlm.cache import cache_dir


def test_speechlm_cache_moves_the_folder_and_parts_are_created(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "elsewhere"))
    folder = cache_dir("converted", "gguf-causal-lm")
    assert folder == tmp_path / "elsewhere" / "converted" / "gguf-causal-lm" and folder.is_dir()


def test_without_speechlm_cache_it_is_dot_cache_speechlm_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEECHLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "speechlm" and cache_dir().is_dir()
    monkeypatch.setenv("SPEECHLM_CACHE", "")  # set but empty: the default too, not the working directory
    assert cache_dir("demo") == tmp_path / ".cache" / "speechlm" / "demo"
