"""The command line: one-line errors, default workdir, config overrides."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from amvlm_jax import main
from amvlm_jax.config import ConfigError, validate

from conftest import REPO_ROOT, experiment_module, tiny_synthetic_config


def _run(*args):
    result = subprocess.run([sys.executable, "-m", "amvlm_jax.main", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.train.nope=1"], "unknown config key '--config.train.nope'"),
        (["--config=experiments/monuseg.py:gpu"], "unknown experiment variant 'gpu'"),
        (["--config=experiments/nothere.py"], "no such experiment file"),
        (["--config=experiments/monuseg.py"], "data.root is not set"),
        (["--config=experiments/monuseg.py", "--config.data.root=/no/such/dir"], "/no/such/dir: data root does not exist"),
        (["--config.mode=train"], "config.mode 'train' is not one of"),
        # Values the command line cannot read as the field's type (absl's own message is two lines of Python terms).
        (["--config.train.epochs=1.5"], "--config.train.epochs=1.5: config.train.epochs takes an integer, got '1.5'"),
        (["--config.train.lr=1e-3x"], "config.train.lr takes a number, got '1e-3x'"),
        (["--config.eval.guidance=maybe"], "config.eval.guidance takes true or false, got 'maybe'"),
        (["--config.eval.zero_shot=[1]"], "config.eval.zero_shot takes a Python dict"),
        # A field without '=' takes the next argument as its value (absl), also when that is another flag: it would
        # have read data.root='--config.mode=evaluate'.
        (["--config=experiments/monuseg.py", "--config.data.root", "--config.mode=evaluate"],
         "--config.data.root needs a value: --config.data.root=VALUE"),
        (["--config.train.epochs", "1.5"], "--config.train.epochs=1.5: config.train.epochs takes an integer, got '1.5'"),
        # What absl reports in two lines ('FATAL Flags parsing error', a hint).
        (["--config.eval.splits=val test"], "config.eval.splits takes a tuple: values joined by ',' without spaces"),
        (["--conifg.train.lr=1"], "error: Unknown command line flag 'conifg.train.lr'"),
        # absl read the last --config alone (and failed on any override: 'config.mode is defined twice').
        (["--config=experiments/synthetic.py", "--config=experiments/monuseg.py"], "--config is given 2 times"),
        # Tracebacks before: a key the command line cannot address, a section replaced by a dict.
        (["--config=experiments/medpix.py:cpu", "--config.eval.zero_shot.Location Category.Head=a head"],
         "the key 'Location Category' holds spaces or punctuation, which the command line cannot address; set its "
         "section whole: --config.eval.zero_shot="),
        (["--config.eval={}"], "config.eval.checkpoint is missing: config.eval has no such field"),
        (["--config=README.md"], "README.md: ConfigError: not a Python experiment file"),
        # A boolean takes no value after a space: absl's usage (the module's docstring) was printed above it.
        (["--config.eval.guidance", "maybe"], "unexpected arguments: maybe"),
        # No launcher in the environment (jax's ValueError was a traceback).
        (["--config.distributed.mode=on"], "config.distributed.mode='on': no multi-process run to join ("),
    ],
)
def test_bad_command_lines_give_one_line_errors(args, expected, tmp_path):
    code, stderr = _run(*args, f"--workdir={tmp_path}")
    assert code != 0
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expected in stderr, stderr


@pytest.mark.parametrize("args, expected", [
    # '--config FILE' (a space, as absl also reads it) counts as --config.
    (["--config", "experiments/nothere.py"], "experiments/nothere.py: no such experiment file"),
    (["--config", "experiments/monuseg.py", "--config=experiments/synthetic.py"],
     "--config is given 2 times (experiments/monuseg.py, experiments/synthetic.py)"),
    (["--config.train.nope=1"], "unknown config key '--config.train.nope': config.train has no 'nope' (known: "),
    (["--config.train.epochs.x=1"],
     "unknown config key '--config.train.epochs.x': config.train.epochs has no 'x' (known: (not a section))"),
    (["--config.train.epochs="], "--config.train.epochs=: config.train.epochs takes an integer, got ''"),
    (["--config.eval.zero_shot={'Type': [1]"],
     "--config.eval.zero_shot={'Type': [1]: config.eval.zero_shot takes a Python dict"),  # Unbalanced: a SyntaxError.
    # A nested corpus field written with a dot, as data.corpus fields are: the parser's error spoke of ConfigDict.
    (["--config.eval.zero_shot={'meta.modality': {'CT': 'a CT', 'MR': 'an MR'}}"],
     "--config.eval.zero_shot={'meta.modality': {'CT': 'a CT', 'MR': 'an MR'}}: config.eval.zero_shot takes keys "
     "without dots; a nested corpus field is written with '/' ('meta/modality' for 'meta.modality')"),
    (["--config.eval.zero_shot={'Grade': {'2.5': 'grade two and a half', '3': 'grade three'}}"],
     "--config.eval.zero_shot={'Grade': {'2.5': 'grade two and a half', '3': 'grade three'}}: config.eval.zero_shot "
     "takes keys without dots (a config key cannot hold one: '2.5')"),
])
def test_check_command_line_names_the_argument_and_the_problem(args, expected):
    # In-process (the subprocess cases above go through absl as a user's command does): the start of the line.
    problem = main.check_command_line(["main", *args])
    assert problem is not None and problem.startswith(expected), problem


@pytest.mark.parametrize("code, remedy", [
    ("EISDIR", "a folder stands where a file belongs: move it away"),
    ("EPERM", "make it writable or choose another folder"), ("EROFS", "make it writable or choose another folder"),
    ("EDQUOT", "free space under your quota"), ("ENOSPC", "free space on that disk"), ("EIO", "fix it"),
])
def test_a_file_problem_names_the_path_the_reason_and_what_to_do(code, remedy, tmp_path):
    import errno

    error = OSError(getattr(errno, code), "the system's words", str(tmp_path / "run" / "x"))
    assert main.file_problem(error) == (f"{tmp_path / 'run' / 'x'}: the system's words; {remedy}, then run the same "
                                        "command again")


def test_every_kind_of_user_error_ends_in_one_line():
    """user_errors' docstring: bad config, data, weights, checkpoint, diverged training."""
    from amvlm_jax.data.folders import DataError
    from amvlm_jax.train.checkpoint import CheckpointError
    from amvlm_jax.train.loop import TrainingError
    from amvlm_jax.weights import WeightError

    for kind in (ConfigError, DataError, WeightError, CheckpointError, TrainingError):
        assert issubclass(kind, main.user_errors()), kind


def test_an_empty_workdir_is_a_one_line_error_not_the_default_workdir(tmp_path):
    # --workdir=$UNSET would have trained in (or resumed) runs/<experiment>.
    result = subprocess.run([sys.executable, "-m", "amvlm_jax.main", "--config=experiments/monuseg.py", "--workdir="],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip() == (
        "error: --workdir is empty: name the run folder, or leave --workdir out for runs/<experiment>")


def test_a_workdir_under_home_is_expanded(tmp_path, monkeypatch):
    # --workdir=~/run reaches main as '~/run' (the shell expands no '~' after '='): not a folder named '~'.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        main.run(tiny_synthetic_config(mode="evaluate"), "~/run")
    assert str(raised.value).startswith(f"--workdir={tmp_path / 'run'}: holds no checkpoint to evaluate with")


def test_a_compilation_cache_below_a_file_is_a_one_line_error(tmp_path):
    import jax

    from amvlm_jax.config import base_config
    from amvlm_jax.train.parallel import enable_compilation_cache

    (tmp_path / "file").write_text("")
    config = base_config()
    config.compilation_cache = str(tmp_path / "file" / "cache")
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.raises(ConfigError, match=f"^config.compilation_cache={tmp_path / 'file' / 'cache'}: "
                                              f"{tmp_path / 'file'} is a file, not a folder"):
            enable_compilation_cache(config)  # jax warned at every entry instead.
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_compilation_cache_that_is_a_file_is_a_one_line_error_of_the_command(tmp_path):
    (tmp_path / "cache").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # The tests' own cache wins.
    result = subprocess.run([sys.executable, "-m", "amvlm_jax.main", f"--config.compilation_cache={tmp_path / 'cache'}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    code, stderr = result.returncode, result.stderr.strip()
    assert code != 0 and stderr == (f"error: config.compilation_cache={tmp_path / 'cache'}: is a file, not a folder "
                                    "('' turns the cache off)")


def test_a_workdir_that_cannot_be_written_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = tiny_synthetic_config()
    for workdir, expected in [(blocker, f"--workdir={blocker}: is a file, not a folder"),
                              (blocker / "run", f"--workdir={blocker / 'run'}: cannot write the run folder there: "
                                                f"Not a directory ({blocker / 'run'})")]:
        with pytest.raises(ConfigError) as raised:
            main.run(config, workdir)
        assert str(raised.value) == expected


def test_evaluating_or_predicting_in_a_workdir_without_a_checkpoint_is_a_one_line_error(tmp_path):
    for mode in ("evaluate", "predict"):
        config = tiny_synthetic_config(mode=mode)
        with pytest.raises(ConfigError) as raised:
            main.run(config, tmp_path / "empty")
        assert str(raised.value) == (f"--workdir={tmp_path / 'empty'}: holds no checkpoint to {mode} with; train there "
                                     "first or name one with --config.eval.checkpoint=PATH (a run's workdir, checkpoint "
                                     "or step folder)")
    assert not (tmp_path / "empty").exists()


def test_check_command_line_accepts_valid_overrides():
    argv = ["main", "--config=experiments/monuseg.py:cpu,labeled25", "--config.train.epochs=3", "--config.data.root=x",
            "--config.train.lr=1e-3", "--config.train.min_lr=0", "--config.eval.guidance=false", "--config.eval.guidance",
            "--config.eval.zero_shot={'Type': {'CT': 'a CT scan', 'MR': 'an MRI scan'}}", "--config.eval.splits=val,test"]
    assert main.check_command_line(argv) is None


def test_a_field_given_twice_takes_its_last_value_for_tuple_fields_too(monkeypatch):
    from absl import flags
    from ml_collections import config_flags

    from amvlm_jax.config import split_name_lists

    experiment = f"--config={REPO_ROOT / 'experiments' / 'monuseg.py'}:cpu"
    argv = ["main", experiment, "--config.eval.splits=val,test", "--config.train.epochs=3",
            "--config.data.corpus.text_fields=report", "--config.eval.splits=test", "--config.train.epochs=5",
            "--config.data.corpus.text_fields=findings,impression", "--config.eval.guidance", "--config.eval.guidance"]

    def parsed(arguments):
        monkeypatch.setattr(sys, "argv", arguments)  # config_flags reads the overrides when the flag is defined.
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=values)
        values(arguments)
        split_name_lists(values.config)
        return values.config

    config = parsed(main.last_overrides(argv))
    assert config.eval.splits == ("test",) and config.train.epochs == 5
    assert config.data.corpus.text_fields == ("findings", "impression") and config.eval.guidance is True
    # What absl alone makes of it: a tuple field's values added up (and its commas then kept in one name).
    alone = parsed(argv)
    assert alone.eval.splits == ("val,test", "test") and alone.train.epochs == 5
    assert main.last_overrides(argv) == [
        "main", experiment, "--config.eval.splits=test", "--config.train.epochs=5",
        "--config.data.corpus.text_fields=findings,impression", "--config.eval.guidance", "--config.eval.guidance"]


@pytest.mark.parametrize("command, flag, shows", [
    (["-m", "amvlm_jax.main"], "--help", "--workdir"),
    ([str(REPO_ROOT / "tools" / "ablation.py")], "--helpfull", "--seeds"),  # A tool: the same start().
])
def test_help_prints_the_flags_and_exits_0(command, flag, shows):
    # absl ends its help with status 1, which a script or `&&` reads as a failure.
    result = subprocess.run([sys.executable, *command, flag], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert shows in result.stdout and "--config" in result.stdout


def test_default_workdir_names_experiment_and_variant():
    assert str(main.default_workdir("experiments/monuseg.py:cpu,labeled25")) == "runs/monuseg_cpu_labeled25"
    assert str(main.default_workdir(main.DEFAULT_CONFIG)) == "runs/synthetic_text_report"


def test_relative_corpus_files_are_taken_from_the_current_folder_unless_data_root_is_set(tmp_path, monkeypatch):
    # The synthetic experiment's generated data folder is not the user's: a corpus named on its command line is
    # found from where the command runs (README's corpus example), but below a data.root the user sets.
    monkeypatch.chdir(tmp_path)
    config = tiny_synthetic_config()
    config.mode = "pretrain"
    config.data.corpus.train = "reports.csv"
    resolved = main.resolve(config, tmp_path / "run")
    assert resolved.data.corpus.train == str(tmp_path / "reports.csv")
    assert resolved.data.root == str(tmp_path / "run" / "data")
    config.data.root = "corpus"
    resolved = main.resolve(config, tmp_path / "run")
    assert resolved.data.corpus.train == "reports.csv" and resolved.data.root == str(tmp_path / "corpus")


def test_a_relative_pretrained_folder_is_recorded_absolute(tmp_path, monkeypatch):
    # Recorded as typed, the tools (text_masks.py --generator) and evaluations run elsewhere looked for it below
    # their own current folder.
    monkeypatch.chdir(tmp_path)
    config = tiny_synthetic_config()
    config.mode = "ssl"
    config.ssl.pretrained = "runs/pre/pretrain"
    assert main.resolve(config, tmp_path / "run").ssl.pretrained == str(tmp_path / "runs" / "pre" / "pretrain")
    # A pre-training run's workdir, as a user names it, is recorded as its pretrain/ (where the encoders are).
    (tmp_path / "runs" / "pre" / "pretrain" / "checkpoints").mkdir(parents=True)
    config.ssl.pretrained = "runs/pre"
    assert main.resolve(config, tmp_path / "run").ssl.pretrained == str(tmp_path / "runs" / "pre" / "pretrain")


def test_relative_encoder_files_are_recorded_absolute_and_hub_ids_as_given(tmp_path, monkeypatch):
    # Recorded as typed, an evaluation or a mean teacher run from another folder took 'models/bert' for a hub id
    # and stopped: the text encoder's config and tokenizer are read from that folder again.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "bert").mkdir(parents=True)
    (tmp_path / "models" / "vit.safetensors").write_bytes(b"")
    config = tiny_synthetic_config()
    config.mode = "pretrain"
    config.pretrain.text_encoder, config.pretrain.vit_weights = "models/bert", "models/vit.safetensors"
    resolved = main.resolve(config, tmp_path / "run")
    assert resolved.pretrain.text_encoder == str(tmp_path / "models" / "bert")
    assert resolved.pretrain.vit_weights == str(tmp_path / "models" / "vit.safetensors")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["pretrain"]
    assert (recorded["text_encoder"], recorded["vit_weights"]) == (str(tmp_path / "models" / "bert"),
                                                                   str(tmp_path / "models" / "vit.safetensors"))
    monkeypatch.setenv("HOME", str(tmp_path / "models"))
    config.pretrain.text_encoder, config.pretrain.vit_weights = "~/bert", ""
    resolved = main.resolve(config, tmp_path / "run")
    assert (resolved.pretrain.text_encoder, resolved.pretrain.vit_weights) == (str(tmp_path / "models" / "bert"), "")
    config.pretrain.text_encoder, config.pretrain.vit_weights = "org/bert-base", "timm/vit_small_patch16_224"
    resolved = main.resolve(config, tmp_path / "run")
    assert (resolved.pretrain.text_encoder, resolved.pretrain.vit_weights) == ("org/bert-base",
                                                                               "timm/vit_small_patch16_224")


def test_validate_rejects_unusable_values():
    config = tiny_synthetic_config()
    config.data.image_size = 100
    with pytest.raises(ConfigError, match="multiple of 16"):
        validate(config)
    for key, value, message in [("vit_attention", "flash", "vit_attention must be"),
                                ("vit_attention", "cudnn", "needs config.dtype='bfloat16'"),
                                ("text_embedding_grad", "dense", "text_embedding_grad must be")]:
        config = tiny_synthetic_config()
        config.pretrain[key] = value
        with pytest.raises(ConfigError, match=message):
            validate(config)


def test_text_embedding_grad_auto_is_scatter_on_cpus():
    from amvlm_jax.train import build

    config = tiny_synthetic_config()
    assert config.pretrain.text_embedding_grad == "auto" and build.text_embedding_grad(config) == "scatter"
    config.pretrain.text_embedding_grad = "one_hot"
    assert build.text_embedding_grad(config) == "one_hot"


def test_vit_attention_auto_takes_cudnn_only_for_bfloat16_on_gpus_whose_cudnn_compiles_it(monkeypatch, capsys):
    from amvlm_jax.train import build

    config = tiny_synthetic_config()
    assert config.pretrain.vit_attention == "auto" and build.vit_attention(config) == "xla"  # This CPU.
    # The probe itself on this CPU: the cuDNN kernel does not lower, so the answer is no, with a one-line note.
    assert build.cudnn_attention_compiles.__wrapped__() is False
    assert "cuDNN fused attention unavailable here" in capsys.readouterr().out
    monkeypatch.setattr(build.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(build, "cudnn_attention_compiles", lambda: True)
    assert build.vit_attention(config) == "xla"  # float32 compute.
    config.dtype = "bfloat16"
    assert build.vit_attention(config) == "cudnn"
    assert build.build_model(config, build.text_encoder_config(config)).image_encoder.attention == "cudnn"
    monkeypatch.setattr(build, "cudnn_attention_compiles", lambda: False)
    assert build.vit_attention(config) == "xla"
    config.pretrain.vit_attention = "xla"
    monkeypatch.setattr(build, "cudnn_attention_compiles", lambda: True)
    assert build.vit_attention(config) == "xla"  # An explicit choice stands.


def test_experiments_load_with_all_variants():
    for path in sorted((REPO_ROOT / "experiments").glob("*.py")):
        module = experiment_module(path.stem)
        assert module.__doc__ and "python -m amvlm_jax.main" in module.__doc__, path
        for variant in [None, *module.VARIANTS]:
            config = module.get_config(variant)
            if config.mode in ("ssl", "all") and config.data.labeled_fraction == 1.0:
                # A mean-teacher variant of a file that keeps every mask: the fraction is asked for.
                with pytest.raises(ConfigError, match="leaves no unlabeled image for the mean teacher"):
                    validate(config)
            else:
                validate(config)


def _fields(config, paths: str) -> tuple:
    return tuple(config[section][name] if name else config[section]
                 for section, _, name in (path.partition(".") for path in paths.split()))


def test_each_variant_sets_what_the_experiment_files_and_spec_say():
    """monuseg.py's docstring (paper settings; cpu: U-Net width 16, batch 4, 150 epochs, a 4-block ViT-Ti/16 at
    96x96, Adam 1e-4, 40 pre-training epochs), SPEC's labelled fractions, ablation weights (0.5 CSS, 0.1 ICL)
    and MGCA's optimiser (AdamW 2e-5, decay 0.05, 40% warm-up, 1e-8, batch 72), typed out by hand."""
    from amvlm_jax.experiment import load_config

    monuseg = REPO_ROOT / "experiments" / "monuseg.py"
    unet = "data.image_size data.num_classes unet.base_width train.batch_size train.epochs train.lr"
    assert _fields(load_config(monuseg), unet) == (224, 1, 64, 16, 200, 1e-3)
    assert _fields(load_config(REPO_ROOT / "experiments" / "qata_cov19.py"), "data.num_classes train.lr") == (1, 3e-4)
    # Background, 10 vertebrae and 9 discs (mrspineseg.py's docstring).
    assert load_config(REPO_ROOT / "experiments" / "mrspineseg.py", "cpu").data.num_classes == 20
    cpu = load_config(monuseg, "cpu")
    assert _fields(cpu, unet + " train.eval_batch_size") == (224, 1, 16, 4, 150, 1e-3, 6)
    small = ("pretrain.vit pretrain.vit_depth pretrain.image_size pretrain.lr pretrain.epochs "
             "pretrain.checkpoint_every_epochs pretrain.vit_weights")
    assert _fields(cpu, small) == ("Ti/16", 4, 96, 1e-4, 40, 5, "")
    fractions = {"labeled25": 0.25, "labeled50": 0.5, "fewshot1": 0.01, "fewshot10": 0.1}
    assert {name: load_config(monuseg, name).data.labeled_fraction for name in fractions} == fractions
    mgca = ("pretrain.objective pretrain.optimizer pretrain.lr pretrain.weight_decay pretrain.schedule "
            "pretrain.warmup_fraction pretrain.min_lr pretrain.batch_size")
    assert _fields(load_config(monuseg, "mgca"), mgca) == ("mgca", "adamw", 2e-5, 0.05, "warmup_cosine", 0.4, 1e-8, 72)
    assert _fields(load_config(monuseg, "mgca,cpu"), mgca)[2] == 1e-4  # In order: cpu's rate last.
    assert _fields(load_config(monuseg, "cpu,mgca"), mgca)[2] == 2e-5
    rows = "pretrain.weights.css pretrain.weights.icl ssl.w_text ssl.train_decoder"
    assert {name: _fields(load_config(monuseg, f"labeled25,{name}"), rows) for name in
            ("vision", "ab_css", "ab_icl", "ab_css_icl", "ab_css_icl_tg")} == {
        "vision": (0.5, 0.1, 0.0, False), "ab_css": (0.5, 0.0, 1.0, False), "ab_icl": (0.0, 0.1, 1.0, False),
        "ab_css_icl": (0.5, 0.1, 1.0, False), "ab_css_icl_tg": (0.5, 0.1, 1.0, True)}
    heads = "ssl.text_head ssl.withhold_reports ssl.text_veto_only"
    assert {name: _fields(load_config(monuseg, name), heads) for name in
            ("text_head", "text_head_blind", "text_report", "text_report_blind")} == {
        "text_head": ("words", False, False), "text_head_blind": ("words", True, False),
        "text_report": ("report", False, True), "text_report_blind": ("report", True, True)}
    assert load_config(monuseg, "textbook_unet").unet.architecture == "textbook"
    with pytest.raises(ConfigError) as raised:
        load_config(monuseg, "cpu,labeled20")
    assert str(raised.value) == (
        "unknown experiment variant 'labeled20'; known: ab_css, ab_css_icl, ab_css_icl_tg, ab_icl, cpu, fewshot1, "
        "fewshot10, labeled25, labeled50, mgca, text_head, text_head_blind, text_report, text_report_blind, "
        "textbook_unet, vision")


def test_mean_teacher_variants_run_the_mean_teacher():
    """The real datasets' files default to mode 'supervised', which reads none of the fields the vision and
    ablation-row variants set: `monuseg.py:cpu,ab_css_icl_tg` trained a supervised U-Net under the row's name.
    Each now names its job: text-guided rows 'all' (pre-training first), the vision-only teacher 'ssl' (no
    pre-training, which mode 'all' ran for nothing on the synthetic data)."""
    expected = {"vision": "ssl", "ab_css": "all", "ab_icl": "all", "ab_css_icl": "all", "ab_css_icl_tg": "all",
                "text_head": "all", "text_head_blind": "all", "text_report": "all", "text_report_blind": "all"}
    for name in ("monuseg", "qata_cov19", "bmseg", "mrspineseg", "synthetic"):
        module = experiment_module(name)
        for variant, mode in expected.items():
            for combined in (f"labeled50,{variant}", f"{variant},fewshot10"):
                config = module.get_config(combined)
                assert config.mode == mode, (name, combined)
                validate(config)


def test_compilation_cache_follows_config_unless_already_set(tmp_path):
    import jax

    from amvlm_jax.config import base_config
    from amvlm_jax.train.parallel import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir  # The test session's own cache.
    config = base_config()
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        config.compilation_cache = ""
        assert enable_compilation_cache(config) is None and jax.config.jax_compilation_cache_dir is None
        config.compilation_cache = str(tmp_path / "a")
        assert enable_compilation_cache(config) == str(tmp_path / "a") == jax.config.jax_compilation_cache_dir
        # A folder set before (by $JAX_COMPILATION_CACHE_DIR or an earlier call) wins.
        config.compilation_cache = str(tmp_path / "b")
        assert enable_compilation_cache(config) == str(tmp_path / "a")
        config.compilation_cache = "~/somewhere"
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache(config) == str(pathlib.Path.home() / "somewhere")
        (tmp_path / "file").write_text("")
        config.compilation_cache = str(tmp_path / "file")
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.raises(ConfigError, match=f"^config.compilation_cache={tmp_path / 'file'}: is a file, not a folder"):
            enable_compilation_cache(config)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


ENV_WITHOUT_TUNABLES = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def _python(code: str, *args, env=None):
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=env if env is not None else ENV_WITHOUT_TUNABLES)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.eval.splits=val,test", "--config.data.corpus.text_fields=findings, impression"],
         "('val', 'test') ('findings', 'impression') ('Type', 'Location Category')"),
        (["--config.eval.splits=test", "--config.eval.probe_fields="], "('test',) ('Description.Caption',) ()"),
        (["--config.eval.splits=('val', 'test')", "--config.eval.probe_fields=[Type]"],
         "('val', 'test') ('Description.Caption',) ('Type',)"),
    ],
)
def test_comma_separated_names_on_the_command_line_are_tuples_of_names(args, expected):
    # Through absl's parsing, as a user types them: the command line alone keeps 'val,test' as one name.
    code = ("from amvlm_jax.main import start; start(lambda c: print(c.eval.splits, c.data.corpus.text_fields, "
            "c.eval.probe_fields))")
    assert _python(code, "--config=experiments/medpix.py", *args, env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": ""}) == [
        expected]


def test_ctrl_c_outside_the_training_loop_says_in_one_line_that_nothing_new_was_saved():
    # Before the first step (compiling, reading data) or in evaluation: no checkpoint of this run to name.
    code = "from amvlm_jax.main import start\ndef job(config):\n    raise KeyboardInterrupt\nstart(job)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": ""})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "interrupted before anything new was saved: the same command starts again (or resumes from the last "
        "checkpoint, if there is one)"]


def test_start_restarts_the_process_once_with_the_malloc_tunables_and_keeps_its_arguments():
    code = ("import os, sys; from amvlm_jax.main import malloc_in_huge_pages; malloc_in_huge_pages(); "
            "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])")
    # One line: the first process is replaced, not followed, by the restarted one.
    expected = repr(main.MALLOC_TUNABLES) if sys.platform == "linux" else "None"
    assert _python(code, "--config.a=1", "x y") == [f"{expected} ['--config.a=1', 'x y']"]
    # Set already (even empty): the process runs as started.
    assert _python(code, env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": ""}) == ["'' []"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables: Linux only")
def test_the_malloc_tunables_stop_large_allocations_faulting_every_page_in_again():
    # What XLA's CPU runtime does every step: large temporaries allocated and freed.
    # (Through malloc itself: numpy asks for huge pages on its own large arrays.)
    code = ("import ctypes, resource\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
            "def touch():\n"
            "    block = libc.malloc(1 << 26); ctypes.memset(block, 1, 1 << 26); libc.free(block)\n"
            "touch()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10): touch()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)")
    plain = int(_python(code, env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": ""})[0])
    huge = int(_python(code, env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": main.MALLOC_TUNABLES})[0])
    assert plain >= 16_000  # 64 MiB in 4 KiB pages, faulted in anew each time.
    assert huge * 10 <= plain  # Reused: none, or a few huge pages.


def test_simulated_cpu_devices_get_a_thread_pool_one_thread_larger_than_xla_gives_them():
    # XLA's in-process all-reduce holds a pool thread per device: with as many threads as devices a step
    # can stall (docs/benchmarks.md). The pool's threads are named tf_XLAEigen.
    code = ("import os, jax, jax.numpy as jnp\n"
            "from amvlm_jax.main import start\n"
            "def job(config):\n"
            "    jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((256, 256))))\n"
            "    names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
            "    print(jax.local_device_count(), names.count('tf_XLAEigen'), os.environ.get('PJRT_NPROC'))\n"
            "start(job)")
    if not pathlib.Path("/proc/self/task").is_dir():
        pytest.skip("counts threads in /proc (Linux)")
    cores = len(os.sched_getaffinity(0))
    plain = {k: v for k, v in ENV_WITHOUT_TUNABLES.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "JAX_NUM_CPU_DEVICES")}
    plain["GLIBC_TUNABLES"] = ""
    for devices in (2, 4):
        env = {**plain, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        pool = max(cores, devices) + 1
        assert _python(code, env=env) == [f"{devices} {pool} {pool}"]
        assert _python(code, env={**plain, "JAX_NUM_CPU_DEVICES": str(devices)}) == [f"{devices} {pool} {pool}"]
    # One device: XLA's own pool; a pool the user set is kept.
    assert _python(code, env=plain) == [f"1 {cores} None"]
    assert _python(code, env={**env, "PJRT_NPROC": "7"}) == ["4 7 7"]


def _start(code: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` defining job(config), run through main.start as a tool runs it, with --workdir's folder tmp_path."""
    return subprocess.run([sys.executable, "-c", f"import pathlib\nW = pathlib.Path({str(tmp_path)!r})\n{code}\n"
                           "from amvlm_jax.main import start\nstart(job)"], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**ENV_WITHOUT_TUNABLES, "GLIBC_TUNABLES": ""}, timeout=120)


def test_a_file_where_the_run_writes_a_folder_is_a_one_line_error_naming_it(tmp_path):
    # A workdir whose tensorboard/ became a file: the system names the events file below it.
    (tmp_path / "tensorboard").write_text("")
    result = _start("from amvlm_jax.train.logging import MetricWriter\n"
                    "def job(config):\n    MetricWriter(W, 0)", tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'tensorboard'}: Not a directory; a file stands where a folder belongs: move it away, "
        "then run the same command again"]


def test_a_checkpoint_the_system_refuses_is_one_line_and_the_run_ends_at_once(tmp_path):
    # Orbax's save threads log the failure with a traceback each and then wait 300 s for the step folder
    # (a read-only or full disk: here a file where the manager's folder stood). A first save waits for the
    # clean-up that a training manager starts in a thread: it would otherwise meet the folder gone (sometimes,
    # under load), and the error would say "No such file or directory".
    result = _start("import shutil, jax.numpy as jnp\nfrom amvlm_jax.train import checkpoint\n"
                    "def job(config):\n    saver = checkpoint.RunCheckpoints(W)\n"
                    "    saver.save(1, {'a': jnp.arange(4.0)}, {'job': 'x'}, is_best=False)\n    saver.wait()\n"
                    "    shutil.rmtree(W / 'checkpoints' / 'latest')\n    (W / 'checkpoints' / 'latest').write_text('')\n"
                    "    saver.save(2, {'a': jnp.arange(4.0)}, {'job': 'x'}, is_best=False)\n    saver.wait()",
                    tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'checkpoints' / 'latest'}: cannot write a checkpoint there (Not a directory): free "
        "space, make it writable or move what stands in its way, then run the same command again (it resumes from "
        "the last checkpoint written)"]


def test_a_second_training_in_a_workdir_that_a_run_trains_in_is_a_one_line_error(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "w") as lock:  # What a training run of another process holds.
        lock.write("process 12345")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError) as raised:
            main.run(tiny_synthetic_config(), tmp_path)
    assert str(raised.value) == (f"--workdir={tmp_path}: process 12345 is training there; wait for it to end or "
                                 "stop it, or choose another --workdir")
    assert not (tmp_path / "config.json").exists()  # Its record stays.
    main.hold_for_training(tmp_path)  # Released with the holder; this process's own lock passes again.
    main.hold_for_training(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"process {os.getpid()}"


def _moved_run(tmp_path, job: str, **recorded) -> pathlib.Path:
    """A workdir new/ holding a checkpoint of ``job`` whose recorded config has ``recorded`` fields (paths in
    old/, where the run trained before the user renamed its workdir)."""
    import jax.numpy as jnp

    from amvlm_jax.train import checkpoint, loop

    saver = checkpoint.RunCheckpoints(tmp_path / "new")
    trained = loop.recorded_config(tiny_synthetic_config(**recorded))
    saver.save(1, {"a": jnp.arange(4.0)}, {"job": job, "epoch": 1, "config": trained}, is_best=True)
    saver.wait()
    saver.close()
    return tmp_path / "new"


def test_evaluating_a_moved_synthetic_run_generates_its_data_in_the_workdir_not_at_the_old_place(tmp_path):
    workdir = _moved_run(tmp_path, "supervised", **{"data.root": str(tmp_path / "old" / "data")})
    config, job = main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), workdir)
    assert job == "supervised" and main.resolve(config, workdir).data.root == str((workdir / "data").absolute())
    assert not (tmp_path / "old").exists()


def test_evaluating_a_moved_mean_teacher_run_finds_its_encoders_in_the_workdir_or_where_the_command_says(tmp_path):
    workdir = _moved_run(tmp_path, "ssl", **{"ssl.pretrained": str(tmp_path / "old" / "pretrain")})
    (workdir / "pretrain").mkdir()
    config, _ = main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), workdir)
    assert config.ssl.pretrained == str(workdir / "pretrain")
    # What the error for encoders that are not there says to do: the command's folder, not the recorded one.
    named = tiny_synthetic_config(**{"mode": "evaluate", "ssl.pretrained": str(tmp_path / "elsewhere")})
    assert main.checkpoint_config(named, workdir)[0].ssl.pretrained == str(tmp_path / "elsewhere")


def _saved(workdir: pathlib.Path, state: dict, meta: dict) -> pathlib.Path:
    from amvlm_jax.train import checkpoint

    saver = checkpoint.RunCheckpoints(workdir)
    saver.save(1, state, {"epoch": 1} | meta, is_best=True)
    saver.wait()
    saver.close()
    return workdir


def test_a_checkpoint_names_its_job_and_what_it_cannot_be_used_for(tmp_path):
    """Written before jobs were named: a state with a teacher is a mean teacher's, one whose teacher is None a
    supervised run's. A pre-training checkpoint predicts nothing, and eval.initial needs one."""
    import jax.numpy as jnp

    params = {"w": jnp.arange(2.0)}
    mean_teacher = _saved(tmp_path / "ssl", {"params": params, "teacher": {"params": params}}, {})
    plain = _saved(tmp_path / "plain", {"params": params, "teacher": None}, {})
    assert main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), mean_teacher)[1] == "ssl"
    assert main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), plain)[1] == "supervised"
    pretrained = _saved(tmp_path / "pre", {"params": params}, {"job": "pretrain"})
    with pytest.raises(ConfigError, match=f"^{pretrained}: a pre-training checkpoint has no segmentation model "
                                          r"\(predict\); pass it as config.ssl.pretrained"):
        main.checkpoint_config(tiny_synthetic_config(mode="predict"), pretrained)
    with pytest.raises(ConfigError, match=f"^{plain}: config.eval.initial scores the encoders a pre-training run "
                                          "started from; this is a 'supervised' checkpoint$"):
        main.checkpoint_config(tiny_synthetic_config(**{"mode": "evaluate", "eval.initial": True}), plain)


def test_a_real_data_run_is_evaluated_on_the_data_the_command_names_else_where_it_recorded_it(tmp_path):
    """Recorded data.name 'monuseg' at old/data, gone: without data.root a one-line error; with one, that
    folder under the recorded name (the command's default 'synthetic' would generate data there)."""
    workdir = _moved_run(tmp_path, "supervised", **{"data.name": "monuseg", "data.root": str(tmp_path / "old" / "data")})
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'old' / 'data'}: the data root that {workdir} recorded does "
                                          r"not exist \(moved\?\); pass --config.data.root=DIR$"):
        main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), workdir)
    other = tmp_path / "other"
    other.mkdir()
    config, _ = main.checkpoint_config(tiny_synthetic_config(**{"mode": "evaluate", "data.root": str(other)}), workdir)
    assert (config.data.name, config.data.root) == ("monuseg", str(other))
    # A synthetic run evaluated on data generated into a folder the command names (not there yet): that folder.
    synthetic = _moved_run(tmp_path / "s", "supervised", **{"data.root": str(tmp_path / "old" / "data")})
    fresh = str(tmp_path / "fresh")
    assert main.checkpoint_config(tiny_synthetic_config(**{"mode": "evaluate", "data.root": fresh}),
                                  synthetic)[0].data.root == fresh


def test_a_pretraining_checkpoint_is_scored_on_its_runs_labels_from_its_own_start(tmp_path):
    """Neither eval.zero_shot nor eval.probe_fields on the command: the run's probe fields, rows and steps.
    Probe fields on the command stand. eval.initial: the run's seed (its initial encoders)."""
    workdir = _moved_run(tmp_path, "pretrain", **{"eval.probe_fields": ("sex",), "eval.probe_rows": 7,
                                                  "eval.probe_steps": 9, "seed": 5})
    config, job = main.checkpoint_config(tiny_synthetic_config(mode="evaluate"), workdir)
    assert job == "pretrain" and config.eval.probe_fields == ("sex",)
    assert (config.eval.probe_rows, config.eval.probe_steps, config.seed) == (7, 9, 0)
    asked = tiny_synthetic_config(**{"mode": "evaluate", "eval.probe_fields": ("age",)})
    config, _ = main.checkpoint_config(asked, workdir)
    assert config.eval.probe_fields == ("age",) and config.eval.probe_rows == tiny_synthetic_config().eval.probe_rows
    config, _ = main.checkpoint_config(tiny_synthetic_config(**{"mode": "evaluate", "eval.initial": True}), workdir)
    assert config.seed == 5


def test_mode_all_guides_with_its_own_pretraining_and_an_evaluation_keeps_the_training_record(tmp_path):
    resolved = main.resolve(tiny_synthetic_config(mode="all"), tmp_path / "run")
    assert resolved.ssl.pretrained == str((tmp_path / "run" / "pretrain").absolute())
    # Its config.json (mode 'all') stays; an evaluation's own record is replaced by the next evaluation's.
    assert main.config_file(tiny_synthetic_config(mode="evaluate"), tmp_path / "run") == tmp_path / "run" / "config_evaluate.json"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "config.json").write_text('{"mode": "predict"}')
    assert main.config_file(tiny_synthetic_config(mode="evaluate"), tmp_path / "eval") == tmp_path / "eval" / "config.json"
