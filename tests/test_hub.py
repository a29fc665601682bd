"""Hub ids for config.pretrain.text_encoder / vit_weights, resolved in a fake hub cache (no network)."""

import hashlib
import json
import os
import shutil
import socket
import time

import httpx2
import numpy as np
import pytest
from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import save_file
from test_encoders import TINY_IMAGE, TINY_VIT, _assert_trees_equal, _random_params, vit_params_to_timm

from amvlm_jax import hub, weights
from amvlm_jax.config import ConfigError, base_config
from amvlm_jax.models.vit import ViT
from amvlm_jax.train import build

TEXT_ID = "sentence-transformers/all-MiniLM-L6-v2"
VIT_ID = "timm/tiny_vit.test"
COMMIT = "a" * 40
TAGGED = "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, set as huggingface_hub's cache (env and constants), with the hub offline."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


def add_to_cache(cache, repo_id, files, commit=COMMIT, ref="main"):
    """Lays ``files`` {name: source path} out as huggingface_hub does: blobs/<etag>,
    snapshots/<commit>/<name> -> ../../blobs/<etag>, refs/<ref> = commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        etag = hashlib.sha256(f"{commit}/{name}".encode()).hexdigest()
        os.symlink(os.path.abspath(source), repo / "blobs" / etag)  # no copy of the 90 MB MiniLM weights
        os.symlink(os.path.join("..", "..", "blobs", etag), snapshot / name)
    (repo / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture
def minilm():
    try:
        return weights.default_text_encoder_dir()
    except FileNotFoundError as error:
        pytest.skip(f"default text encoder package not installed: {error}")


def minilm_files(minilm):
    names = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
             "special_tokens_map.json")
    return {name: os.path.join(minilm, name) for name in names}


@pytest.fixture
def vit_file(tmp_path):
    """(A tiny ViT's timm-layout model.safetensors, its params)."""
    params = _random_params(ViT(**TINY_VIT), np.zeros((1, TINY_IMAGE, TINY_IMAGE, 3), np.float32))
    path = tmp_path / "model.safetensors"
    save_file(vit_params_to_timm(params), str(path))
    return str(path), params


def test_text_encoder_id_resolves_to_its_snapshot_and_loads_like_the_folder(cache, minilm):
    snapshot = add_to_cache(cache, TEXT_ID, minilm_files(minilm))
    assert snapshot_download(TEXT_ID, local_files_only=True) == snapshot  # the layout is huggingface_hub's
    assert not scan_cache_dir(cache).warnings
    resolved = hub.resolve_text_encoder(TEXT_ID)
    assert resolved == snapshot
    config, params = weights.load_bert(resolved)
    original_config, original_params = weights.load_bert(minilm)
    assert config == original_config
    _assert_trees_equal(params, original_params)


def test_text_encoder_revision_by_commit_or_tag(cache, minilm):
    main = add_to_cache(cache, TEXT_ID, minilm_files(minilm))
    tagged = add_to_cache(cache, TEXT_ID, minilm_files(minilm), commit=TAGGED, ref="v1")
    assert hub.resolve_text_encoder(f"{TEXT_ID}@{COMMIT}") == main
    assert hub.resolve_text_encoder(f"{TEXT_ID}@v1") == tagged
    assert hub.resolve_text_encoder(f"{TEXT_ID}@{TAGGED}") == tagged


def test_text_encoder_id_through_the_config(cache, minilm):
    snapshot = add_to_cache(cache, TEXT_ID, minilm_files(minilm))
    config = base_config()
    config.pretrain.text_encoder = TEXT_ID
    assert build.text_encoder_dir(config) == snapshot
    assert build.text_encoder_config(config) == weights.load_bert(minilm)[0]
    config.pretrain.text_encoder = ""
    assert build.text_encoder_dir(config) == minilm


def test_missing_id_offline_says_what_to_fetch(cache):
    with pytest.raises(ConfigError) as info:
        hub.resolve_text_encoder("emilyalsentzer/Bio_ClinicalBERT")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config.pretrain.text_encoder: 'emilyalsentzer/Bio_ClinicalBERT' is no existing path")
    assert f"in the hub cache {cache} while HF_HUB_OFFLINE is set" in message
    assert ("`hf download emilyalsentzer/Bio_ClinicalBERT model.safetensors pytorch_model.bin config.json "
            "tokenizer.json vocab.txt tokenizer_config.json`") in message
    assert str(cache / "models--emilyalsentzer--Bio_ClinicalBERT") in message

    with pytest.raises(ConfigError) as info:
        hub.resolve_vit_weights("facebook/deit-small-patch16-224@v2")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config.pretrain.vit_weights: 'facebook/deit-small-patch16-224@v2' is no existing path")
    assert "(revision v2)" in message
    assert ("`hf download facebook/deit-small-patch16-224 --revision v2 model.safetensors pytorch_model.bin "
            "open_clip_model.safetensors open_clip_pytorch_model.bin`") in message


def test_partly_cached_text_encoder_names_the_missing_file(cache, minilm):
    add_to_cache(cache, TEXT_ID, {"model.safetensors": os.path.join(minilm, "model.safetensors")})
    with pytest.raises(ConfigError, match=rf"has no config.json in the hub cache .* --revision {COMMIT} "):
        hub.resolve_text_encoder(TEXT_ID)


def test_neither_path_nor_id(cache):
    for name in ("/no/such/bert", "./bert", "bert", "a/b/c", "owner/name@"):
        with pytest.raises(ConfigError, match=rf"^config.pretrain.text_encoder: path '{name}' does not exist"):
            hub.resolve_text_encoder(name)
    # A WeightError too, for the weight tools.
    with pytest.raises(weights.WeightError, match=r"^config.pretrain.vit_weights: path '/no/vit.pth' does not exist"):
        weights.load_vit("/no/vit.pth", TINY_VIT)


def test_local_paths_pass_through(cache, minilm, vit_file):
    assert hub.resolve_text_encoder(minilm) == minilm
    assert hub.resolve_vit_weights(vit_file[0]) == vit_file[0]


def test_vit_id_loads_like_its_file(cache, vit_file, tmp_path):
    path, params = vit_file
    bin_only = tmp_path / "pytorch_model.bin"
    bin_only.write_bytes(b"")
    snapshot = add_to_cache(cache, VIT_ID, {"model.safetensors": path, "pytorch_model.bin": bin_only})
    assert hub.resolve_vit_weights(VIT_ID) == os.path.join(snapshot, "model.safetensors")
    _assert_trees_equal(weights.load_vit(VIT_ID, TINY_VIT, image_size=TINY_IMAGE),
                        weights.load_vit(path, TINY_VIT, image_size=TINY_IMAGE))
    _assert_trees_equal(weights.load_vit(VIT_ID, TINY_VIT, image_size=TINY_IMAGE), params)
    other = add_to_cache(cache, "facebook/vit-bin", {"pytorch_model.bin": bin_only})
    assert hub.resolve_vit_weights("facebook/vit-bin") == os.path.join(other, "pytorch_model.bin")


def _http_error(kind, url="https://huggingface.co/x"):
    return kind("404", response=httpx2.Response(404, request=httpx2.Request("HEAD", url)))


@pytest.fixture
def online(cache, monkeypatch):
    """The hub online, its reachability check answered without the network (hf_hub_download is the test's)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_hf_file_metadata", lambda url: None)


def test_online_downloads_what_the_cache_lacks(cache, online, vit_file, monkeypatch):
    """The download path with hf_hub_download replaced: the first weights file the hub has is
    downloaded; an unreachable hub or an unknown repository gives a one-line error."""
    asked = []

    def download(repo_id, filename, revision, cache_dir):
        asked.append(filename)
        if filename != "pytorch_model.bin":
            raise _http_error(RemoteEntryNotFoundError)
        source = os.path.join(os.path.dirname(vit_file[0]), "pytorch_model.bin")
        shutil.copy(vit_file[0], source)
        return os.path.join(add_to_cache(cache, repo_id, {filename: source}), filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    assert hub.resolve_vit_weights(VIT_ID).endswith(f"snapshots/{COMMIT}/pytorch_model.bin")
    # Then, optional, the pixel normalisation the weights declare (this hub has neither file).
    assert asked == ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "preprocessor_config.json", "open_clip_config.json", "config.json"]
    asked.clear()
    assert hub.resolve_vit_weights(VIT_ID).endswith("pytorch_model.bin")  # now from the cache
    assert asked == []

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(ConfigError, match=r"while the hub is unreachable; on an online machine run `hf download"):
        hub.resolve_vit_weights("owner/elsewhere")

    def unknown(*args, **kwargs):
        raise _http_error(RepositoryNotFoundError)

    monkeypatch.setattr(hub, "hf_hub_download", unknown)
    with pytest.raises(ConfigError, match=r"^config.pretrain.vit_weights: 'owner/typo' is neither an existing "
                                          r"path nor a hub model \(for a gated or private one, .*`hf auth login`\)$"):
        hub.resolve_vit_weights("owner/typo")


def test_online_text_encoder_downloads_one_commit_and_then_uses_the_cache(cache, online, minilm, monkeypatch):
    """hf_hub_download replaced: a download pins the commit the weights came from for the other files and
    also fetches tokenizer_config.json; once cached, nothing is asked of the hub."""
    asked = []

    def download(repo_id, filename, revision, cache_dir):
        asked.append((filename, revision))
        return os.path.join(add_to_cache(cache, repo_id, {filename: os.path.join(minilm, filename)}), filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    snapshot = str(cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / COMMIT)
    assert hub.resolve_text_encoder(TEXT_ID) == snapshot
    assert asked == [("model.safetensors", "main"), ("config.json", COMMIT), ("tokenizer.json", COMMIT),
                     ("tokenizer_config.json", COMMIT)]
    asked.clear()
    assert hub.resolve_text_encoder(TEXT_ID) == snapshot
    assert asked == []


def test_unreachable_hub_fails_at_once_without_retry_warnings(cache, monkeypatch, capfd, caplog):
    """HF_HUB_OFFLINE unset and the hub's address refusing connections (a closed local port): the one-line
    error comes at once, not after huggingface_hub's ~25 s of retries and their logged warnings."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^config.pretrain.vit_weights: 'owner/elsewhere' is no existing path, "
                                          r".* while the hub is unreachable; on an online machine run `hf download"):
        hub.resolve_vit_weights("owner/elsewhere")
    assert time.monotonic() - start < 5
    assert not caplog.records and not capfd.readouterr().err


def test_pretraining_names_an_uncached_vit_id_before_reading_the_data(cache, tmp_path):
    from conftest import tiny_pretrain_config

    from amvlm_jax.data.folders import DataError
    from amvlm_jax.train import pretrain

    config = tiny_pretrain_config()
    config.data.name, config.data.root = "monuseg", str(tmp_path / "no_data")
    with pytest.raises(DataError):  # What the run meets first without the weights.
        pretrain.train(config, tmp_path / "run")
    config.pretrain.vit_weights = "facebook/deit-tiny-patch16-224"
    with pytest.raises(ConfigError, match=r"^config.pretrain.vit_weights: 'facebook/deit-tiny-patch16-224' is no "
                                          "existing path, .* while HF_HUB_OFFLINE is set"):
        pretrain.train(config, tmp_path / "run")


def test_sharded_weights_in_the_cache_resolve_with_their_shards(cache, vit_file, tmp_path):
    """A sharded checkpoint (model.safetensors.index.json and its shards) in the cache loads; a shard the
    cache lacks offline is a one-line error naming it, not a misleading 'has no model.safetensors'."""
    path, params = vit_file
    state = vit_params_to_timm(params)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    files = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
        files[shard] = tmp_path / shard
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    add_to_cache(cache, "me/sharded", dict(files, **{index.name: index}))
    resolved = hub.resolve_vit_weights("me/sharded")
    assert resolved.endswith(f"snapshots/{COMMIT}/model.safetensors.index.json")
    _assert_trees_equal(weights.load_vit("me/sharded", TINY_VIT, image_size=TINY_IMAGE), params)

    add_to_cache(cache, "me/halfsharded", {index.name: index, "model-00001-of-00002.safetensors": files[
        "model-00001-of-00002.safetensors"]})
    with pytest.raises(weights.WeightError) as info:
        weights.load_vit("me/halfsharded", TINY_VIT, image_size=TINY_IMAGE)
    assert "has no model-00002-of-00002.safetensors in the hub cache" in str(info.value)
    assert "\n" not in str(info.value)


def test_pixel_normalisation_a_hub_snapshot_or_folder_declares_must_be_the_configs(cache, vit_file, tmp_path):
    """timm's hub config.json or an HF preprocessor_config.json beside the weights names the normalisation the
    ViT was trained with: another one in the config stops pre-training, before the data, naming the fields."""
    from conftest import tiny_pretrain_config

    from amvlm_jax.train import pretrain

    settings = tmp_path / "timm_config.json"
    settings.write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                    "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    snapshot = add_to_cache(cache, "timm/augreg", {"model.safetensors": vit_file[0], "config.json": settings})
    assert weights.declared_pixel_normalisation(weights.vit_weights_file("timm/augreg")) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), os.path.join(snapshot, "config.json"))
    config = tiny_pretrain_config()
    config.data.name, config.data.root = "monuseg", str(tmp_path / "no_data")
    config.pretrain.vit_weights = "timm/augreg"
    with pytest.raises(weights.WeightError) as info:
        pretrain.train(config, tmp_path / "run")
    assert str(info.value) == (
        f"config.pretrain.vit_pixel_mean / vit_pixel_std: {os.path.join(snapshot, 'config.json')} declares the "
        "weights' pixel normalisation mean 0.5,0.5,0.5, std 0.5,0.5,0.5, not the config's 0.485,0.456,0.406 / "
        "0.229,0.224,0.225; pass --config.pretrain.vit_pixel_mean=0.5,0.5,0.5 --config.pretrain.vit_pixel_std=0.5,0.5,0.5")
    config.pretrain.vit_pixel_mean = config.pretrain.vit_pixel_std = (0.5, 0.5, 0.5)
    from amvlm_jax.data.folders import DataError

    with pytest.raises(DataError):  # Past the weights: the data is what is missing now.
        pretrain.train(config, tmp_path / "run")
    # An HF save_pretrained folder: its image processor's settings.
    from transformers import ViTImageProcessor

    folder = tmp_path / "google_vit"
    folder.mkdir()
    shutil.copy(vit_file[0], folder / "model.safetensors")
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    assert weights.declared_pixel_normalisation(weights.vit_weights_file(str(folder)))[:2] == ((0.5,) * 3, (0.5,) * 3)
    weights.check_pixel_normalisation(weights.vit_weights_file(str(folder)), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(weights.WeightError, match="preprocessor_config.json declares"):
        weights.check_pixel_normalisation(weights.vit_weights_file(str(folder)), (0.485, 0.456, 0.406),
                                          (0.229, 0.224, 0.225))
    # A bare file declares nothing; the ViT the job builds normalises with the config's fields.
    assert weights.declared_pixel_normalisation(vit_file[0]) is None
    model = build.build_model(config, build.text_encoder_config(config))
    assert model.image_encoder.pixel_mean == (0.5, 0.5, 0.5) and model.image_encoder.pixel_std == (0.5, 0.5, 0.5)


def test_an_open_clip_model_gives_its_vit_and_its_pixel_normalisation(cache, vit_file, tmp_path):
    """An open_clip hub model (BiomedCLIP's layout: a timm ViT under 'visual.trunk.', its projection head beside
    it, a BERT text tower under 'text.transformer.', open_clip_config.json with the CLIP pixel statistics) as a
    hub id or a folder: the ViT loads from the trunk, and the config must use the statistics it declares."""
    path, params = vit_file
    width = TINY_VIT["width"]
    clip = {f"visual.trunk.{k}": v for k, v in weights.read_state_dict(path).items()}
    clip |= {"visual.head.proj.weight": np.ones((8, width), np.float32),
             "text.transformer.embeddings.word_embeddings.weight": np.ones((30, 16), np.float32),
             "text.transformer.encoder.layer.0.attention.self.query.weight": np.ones((16, 16), np.float32),
             "text.proj.0.weight": np.ones((8, 16), np.float32), "logit_scale": np.zeros((), np.float32)}
    save_file(clip, str(tmp_path / "open_clip_model.safetensors"))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}},
        "preprocess_cfg": {"mean": list(mean), "std": list(std)}}))
    files = {name: tmp_path / name for name in ("open_clip_model.safetensors", "open_clip_config.json")}
    snapshot = add_to_cache(cache, "microsoft/clip-like", files)
    folder = tmp_path / "clip_folder"
    folder.mkdir()
    for name, source in files.items():
        shutil.copy(source, folder / name)
    for name, expected in (("microsoft/clip-like", snapshot), (str(folder), str(folder))):
        file = weights.vit_weights_file(name)
        assert file == os.path.join(expected, "open_clip_model.safetensors")
        _assert_trees_equal(weights.load_vit(name, TINY_VIT, image_size=TINY_IMAGE), params)
        assert weights.declared_pixel_normalisation(file) == (mean, std, os.path.join(expected, "open_clip_config.json"))
        weights.check_pixel_normalisation(file, mean, std)
        with pytest.raises(weights.WeightError, match="open_clip_config.json declares the weights' pixel normalisation"):
            weights.check_pixel_normalisation(file, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_a_path_under_the_home_folder_is_expanded_not_taken_for_a_hub_id(cache, minilm, vit_file, tmp_path,
                                                                        monkeypatch):
    """--config.pretrain.text_encoder=~/bert: the shell leaves a '~' after '=' alone, and the other path fields
    (data.root, the workdir) expand it; here too, rather than 'path does not exist (and it is no hub id)'."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    os.symlink(minilm, home / "bert")
    os.symlink(vit_file[0], home / "vit.safetensors")
    assert hub.resolve_text_encoder("~/bert") == str(home / "bert")
    assert hub.resolve_vit_weights("~/vit.safetensors") == str(home / "vit.safetensors")
    config = base_config()
    config.pretrain.text_encoder = "~/bert"
    assert build.text_encoder_config(config) == weights.load_bert(minilm)[0]
    _assert_trees_equal(weights.load_vit("~/vit.safetensors", TINY_VIT, image_size=TINY_IMAGE), vit_file[1])


def test_a_file_the_cache_records_as_missing_gives_way_to_the_next(cache, tmp_path):
    """huggingface_hub notes a file a download found missing (.no_exist/<commit>/<name>) and then answers with a
    marker, not a path: the next alternative that the cache holds is used."""
    weights_file = tmp_path / "pytorch_model.bin"
    weights_file.write_bytes(b"")
    snapshot = add_to_cache(cache, VIT_ID, {"pytorch_model.bin": weights_file})
    missing = cache / ("models--" + VIT_ID.replace("/", "--")) / ".no_exist" / COMMIT
    missing.mkdir(parents=True)
    (missing / "model.safetensors").touch()
    assert hub.resolve_vit_weights(VIT_ID) == os.path.join(snapshot, "pytorch_model.bin")


def test_a_hub_answer_to_the_reachability_check_is_left_to_the_download(cache, online, monkeypatch):
    """An HTTP answer (here: no such repository) to the one-request check is no 'unreachable hub': the download
    meets it too and names it."""
    def no_repository(*args, **kwargs):
        raise _http_error(RepositoryNotFoundError)

    monkeypatch.setattr(hub, "get_hf_file_metadata", no_repository)
    monkeypatch.setattr(hub, "hf_hub_download", no_repository)
    with pytest.raises(ConfigError, match=r"^config.pretrain.vit_weights: 'owner/typo' is neither an existing path "
                                          r"nor a hub model"):
        hub.resolve_vit_weights("owner/typo")


def test_online_a_hub_model_without_the_files_or_the_revision_is_named(cache, online, monkeypatch):
    for kind, name, problem in (
            (RemoteEntryNotFoundError, "owner/empty", "hub model owner/empty (revision main) has no model.safetensors "
                                                      "or model.safetensors.index.json or pytorch_model.bin or "
                                                      "pytorch_model.bin.index.json or open_clip_model.safetensors or "
                                                      "open_clip_pytorch_model.bin"),
            (RevisionNotFoundError, "owner/model@v9", "hub model owner/model has no revision 'v9'")):
        def download(*args, kind=kind, **kwargs):
            raise _http_error(kind)

        monkeypatch.setattr(hub, "hf_hub_download", download)
        with pytest.raises(ConfigError) as info:
            hub.resolve_vit_weights(name)
        assert str(info.value) == f"config.pretrain.vit_weights: {problem}"
