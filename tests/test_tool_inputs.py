"""Bad command-line input to tools/uncertainty.py, text_masks.py, convert_weights.py, synthetic_pixels.py and benchmark.py: one-line
errors, found before any model is built."""

import pytest

from amvlm_jax import weights
from amvlm_jax.config import ConfigError
from conftest import repo_module


def test_uncertainty_checks_split_count_and_image_names():
    uncertainty = repo_module("tools/uncertainty.py")
    uncertainty.check_flags("val", 1)
    with pytest.raises(ConfigError, match=r"^--split=bogus: not a split; one of train, val, test$"):
        uncertainty.check_flags("bogus", 5)
    with pytest.raises(ConfigError, match=r"^--count=0: must be 1 or more$"):
        uncertainty.check_flags("val", 0)
    # The split's names are file stems; --image may be a file name, as the tool's docstring writes it.
    names = ["syn_00000", "syn_00001"]
    assert uncertainty.image_row(names, "syn_00001.png", "val") == 1
    assert uncertainty.image_row(names, "syn_00001", "val") == 1
    with pytest.raises(ConfigError, match=r"^--image=syn_00009.png: not an image of val$"):
        uncertainty.image_row(names, "syn_00009.png", "val")


def test_uncertainty_refuses_a_pre_training_without_pdt_heads(tmp_path, monkeypatch):
    """MGCA's objective has no PDT heads to analyse: a one-line error naming the checkpoint, not a KeyError."""
    from amvlm_jax.train import ssl
    from conftest import tiny_synthetic_config

    uncertainty = repo_module("tools/uncertainty.py")
    recorded = tiny_synthetic_config(**{"pretrain.objective": "mgca"})
    monkeypatch.setattr(ssl, "restore_pretrained", lambda config, source, mesh: (recorded, None, {}, {}, source))
    config = tiny_synthetic_config(**{"ssl.pretrained": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"^{tmp_path}: pre-trained with objective 'mgca'; the uncertainty analysis "
                                          "needs the AMVLM objective's PDT heads$"):
        uncertainty.load_model(config, tmp_path / "run")


def test_synthetic_pixels_checks_the_split_before_reading_the_checkpoint():
    synthetic_pixels = repo_module("tools/synthetic_pixels.py")
    synthetic_pixels.check_split("test")
    # Was a KeyError traceback from the folder lookup, after the model was restored.
    with pytest.raises(ConfigError, match=r"^--split=bogus: not a split; one of train, val, test$"):
        synthetic_pixels.check_split("bogus")


def test_text_masks_checks_splits_and_makes_the_workdir_before_scoring(tmp_path):
    text_masks = repo_module("tools/text_masks.py")
    workdir = tmp_path / "new" / "run"
    assert text_masks.check_flags("val, train", workdir) == ["val", "train"]
    assert workdir.is_dir()  # The results are written there after the scoring.
    with pytest.raises(ConfigError, match=r"^--splits=val,bogus: no split 'bogus'; one of train, val, test$"):
        text_masks.check_flags("val,bogus", workdir)
    with pytest.raises(ConfigError, match=r"^--splits=,: names no split"):
        text_masks.check_flags(",", workdir)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--workdir=.*file: cannot write the results there"):
        text_masks.check_flags("val", tmp_path / "file")


def test_text_masks_names_missing_encoders_in_its_own_terms(tmp_path):
    from conftest import tiny_synthetic_config

    text_masks = repo_module("tools/text_masks.py")
    # A mistyped or supervised workdir: was the training job's advice (config.ssl.w_text=0 ...).
    with pytest.raises(ConfigError, match=r"^.*sup_0.pretrain: no pre-trained encoders; --workdir names a pre-training run"):
        text_masks.check_encoders(tiny_synthetic_config(), tmp_path / "sup_0")
    (tmp_path / "pre" / "pretrain").mkdir(parents=True)
    text_masks.check_encoders(tiny_synthetic_config(), tmp_path / "pre")


def test_text_masks_keeps_the_commands_pretrained_folder_over_the_generators_record(tmp_path, monkeypatch):
    from amvlm_jax.train import checkpoint
    from conftest import tiny_synthetic_config

    text_masks = repo_module("tools/text_masks.py")
    # A mean teacher trained with a relative --config.ssl.pretrained, read from another folder or after a move.
    monkeypatch.setattr(checkpoint, "read_meta", lambda source: {"config": {"ssl": {"pretrained": "runs/pre/pretrain"}}})
    config = tiny_synthetic_config()
    assert text_masks.run_config(config, tmp_path, "runs/text_0").ssl.pretrained == "runs/pre/pretrain"
    config.ssl.pretrained = str(tmp_path / "moved" / "pretrain")
    assert text_masks.run_config(config, tmp_path, "runs/text_0").ssl.pretrained == str(tmp_path / "moved" / "pretrain")


def test_convert_weights_rejects_an_out_that_is_a_file(tmp_path, capsys):
    convert = repo_module("tools/convert_weights.py")
    out = tmp_path / "out"
    out.write_text("")
    # Checked before the source is read.
    assert convert.main(["--kind", "vit", "--src", str(tmp_path / "none.safetensors"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out={out}: is a file, not a folder\n"
    with pytest.raises(weights.WeightError, match=r"out: cannot write the checkpoint there"):
        weights.save_params_checkpoint(out, {"w": 0})


def test_convert_weights_names_its_own_flag_for_a_bad_source(tmp_path, capsys):
    convert = repo_module("tools/convert_weights.py")
    image = tmp_path / "a.png"
    image.write_bytes(b"not weights")
    assert convert.main(["--kind", "vit", "--src", str(image), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --src: {image}: unknown checkpoint format")
    assert convert.main(["--kind", "bert", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: --src: {tmp_path / 'none'}: no such folder (a HuggingFace BERT folder: "
                                       "config.json, weights, vocabulary)\n")


@pytest.mark.parametrize("flag, bound", [("--steps=0", "0 is not a positive integer"),
                                         ("--warmup=-1", "-1 is not a non-negative integer"),
                                         ("--batches=0", "0 is not a positive integer")])
def test_benchmark_refuses_counts_it_cannot_time_before_building_anything(flag, bound):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    # --steps=0 was a ZeroDivisionError traceback after the step had compiled.
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "benchmark.py"), "--config=experiments/synthetic.py",
                           flag], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"flag {flag}: {bound}" in done.stderr and "Traceback" not in done.stderr
