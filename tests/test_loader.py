"""Model loading: clear errors for bad paths; the embedded model's recorded facts."""

import pytest

from rotary.models.loader import ModelLoadError, load_model, resolve_model_dir


def test_missing_path_names_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nothing-here.*does not exist.*Hugging Face model directory"):
        resolve_model_dir(tmp_path / "nothing-here")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model_dir(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model_dir(f)


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        resolve_model_dir(f)


@pytest.mark.model
def test_embedded_model_facts_and_local_directory_loading():
    loaded = load_model(None)
    info = loaded.info
    assert (info.architecture, info.num_layers, info.num_kv_heads, info.head_dim) == ("llama", 30, 3, 64)
    assert info.rope.convention == "half" and info.rope.composable and info.rope.theta > 0
    # The converted directory loads through the same loader as any local HF directory, with the same facts.
    again = load_model(info.path)
    assert again.info.num_layers == info.num_layers and again.info.rope == info.rope


def test_kv_snapshots_go_to_rotary_kv_dir_when_set_else_the_cache(tmp_path, monkeypatch):
    from rotary.models.loader import KV_DIR_ENV, cache_dir, kv_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(KV_DIR_ENV)
    assert kv_dir() == cache_dir() / "kv" == tmp_path / "cache" / "rotary" / "kv"
    monkeypatch.setenv(KV_DIR_ENV, str(tmp_path / "elsewhere"))
    assert kv_dir() == tmp_path / "elsewhere"


def test_the_suite_keeps_every_test_s_snapshots_out_of_the_user_s_cache(tmp_path_factory):
    """tests/conftest.py's autouse fixtures: this test's processes inherit a $ROTARY_KV_DIR of its own,
    under the session's temporary folder (the user's ~/.cache/rotary/kv is never written by the suite)."""
    import os
    from pathlib import Path

    from rotary.models.loader import KV_DIR_ENV

    folder = Path(os.environ[KV_DIR_ENV])
    assert folder.is_relative_to(tmp_path_factory.getbasetemp()) and folder.is_dir() and not any(folder.iterdir())


@pytest.mark.model
def test_the_tokenizer_encodes_and_decodes_as_transformers_does():
    """Rotary's tokenizer (models/tokenizer.py, the `tokenizers` library alone) against transformers' own
    for the embedded model (tests/conftest.py's reference): the same ids for real code (the standard
    library's first files), the same texts back, the same special ids, end token, vocabulary and size."""
    from rotary.bench.corpus import python_files
    from tests.conftest import reference_tokenizer, rotary_model

    ours, theirs = rotary_model().tokenizer, reference_tokenizer()
    assert type(ours).__module__ == "rotary.models.tokenizer"
    files = python_files(None)[:12]
    assert len(files) == 12
    for path in files:
        text = path.read_text(errors="replace")[:4000] + "<|endoftext|><file_sep> tail"
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    assert ours.eos_token_id == theirs.eos_token_id and len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()


@pytest.mark.model
def test_loading_the_embedded_model_needs_no_transformers_and_keeps_no_copy_of_its_weights():
    """A worker's load (after `make`'s one-time preparation) imports no transformers (2-7 s of start-up
    each) and reads the weights from the GGUF: the prepared folder holds no weights file."""
    import subprocess

    from rotary.completion.rpc.launch import python_command
    from rotary.models.loader import resolve_model_dir

    folder = resolve_model_dir(None)
    assert not [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    code = ("import sys; from rotary.models.loader import load_model; from rotary.models.runner import ModelRunner; "
            "r = ModelRunner(load_model(None)); print(r.path, 'transformers' in sys.modules)")
    out = subprocess.run(python_command("-c", code), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["own", "False"]
