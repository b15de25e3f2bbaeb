"""The persistent compilation cache switch of command-line runs."""
import jax

from rlaifv_jax.core import compile_cache


def test_compile_cache_dir_from_env(monkeypatch, tmp_path):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(compile_cache.ENV, "")
        assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cc"))
        assert compile_cache.enable() == str(tmp_path / "cc") and (tmp_path / "cc").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "other"))
        assert compile_cache.enable() == str(tmp_path / "cc")  # a directory already set wins
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.default_dir() == str(tmp_path / "xdg" / "rlaifv_jax" / "jax")
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
