"""HuggingFace hub ids for the pre-trained encoders.

``config.pretrain.text_encoder`` and ``config.pretrain.vit_weights`` take a
local path or a hub id ``owner/name`` (``owner/name@revision`` for a branch,
tag or commit). An id resolves to files in the hub cache (``HF_HUB_CACHE``,
else ``HF_HOME/hub``); what the cache lacks is downloaded unless
``HF_HUB_OFFLINE`` is set. A revision's cached files are used without asking
the hub whether the branch has moved.
"""

from __future__ import annotations

import contextlib
import os
import re

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from amvlm_jax.config import ConfigError
from amvlm_jax.weights import OPEN_CLIP_WEIGHTS, WeightError, shard_files

TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TEXT_TOKENIZER = ("tokenizer.json", "vocab.txt")
TEXT_SETTINGS = "tokenizer_config.json"  # do_lower_case, where the repository has it
VIT_WEIGHTS = ("model.safetensors", "pytorch_model.bin") + OPEN_CLIP_WEIGHTS
# HF's image processor, open_clip's preprocess_cfg, timm's pretrained_cfg.
VIT_SETTINGS = ("preprocessor_config.json", "open_clip_config.json", "config.json")
SHARDED = {"model.safetensors": "model.safetensors.index.json", "pytorch_model.bin": "pytorch_model.bin.index.json"}

_REPO_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")


class HubError(ConfigError, WeightError):
    """A name that is neither an existing path nor a hub id the cache or the hub can serve
    (one line, naming the config field): a ConfigError to runs, a WeightError to weight loaders."""


def local_path(name: str) -> str | None:
    """``name`` with ``~`` expanded (the shell leaves it after ``=``) where that is an existing path, else None
    (a hub id): the one rule by which both fields tell a path from an id."""
    local = os.path.expanduser(name)
    return local if name and os.path.exists(local) else None


def resolve_text_encoder(name: str, cache_dir=None) -> str:
    """The local BERT folder that ``config.pretrain.text_encoder`` names.

    Returns ``name`` itself (``~`` expanded: the shell leaves it after ``=``)
    when it is an existing path; for a hub id, the cache's snapshot folder of
    that revision, holding config.json, the weights (model.safetensors, else
    pytorch_model.bin) and tokenizer.json or vocab.txt (plus
    tokenizer_config.json where a download fetched it). ``cache_dir``
    defaults to huggingface_hub's cache.
    """
    if local := local_path(name):
        return local
    repo = _Repo(name, "config.pretrain.text_encoder", cache_dir,
                 TEXT_WEIGHTS + ("config.json",) + TEXT_TOKENIZER + (TEXT_SETTINGS,))
    folder = os.path.dirname(repo.weights(TEXT_WEIGHTS))
    repo.file(("config.json",))
    repo.file(TEXT_TOKENIZER)
    if repo.downloaded:  # optional: a fetch takes it too, a cached folder is used as it is (no network)
        with contextlib.suppress(LocalEntryNotFoundError):
            repo.download((TEXT_SETTINGS,))
    return folder


def resolve_vit_weights(name: str, cache_dir=None) -> str:
    """The local ViT checkpoint file that ``config.pretrain.vit_weights`` names.

    Returns ``name`` itself (``~`` expanded) when it is an existing path; for
    a hub id, the cached model.safetensors of that revision, else its
    pytorch_model.bin, else open_clip's weights (a CLIP model whose ViT load_vit
    takes). ``cache_dir`` defaults to huggingface_hub's cache.
    """
    if local := local_path(name):
        return local
    repo = _Repo(name, "config.pretrain.vit_weights", cache_dir, VIT_WEIGHTS)
    path = repo.weights(VIT_WEIGHTS)
    if repo.downloaded:  # optional: the pixel normalisation the weights declare (weights.check_pixel_normalisation)
        for settings in VIT_SETTINGS:
            with contextlib.suppress(LocalEntryNotFoundError):
                repo.download((settings,))
    return path


class _Repo:
    """A hub id ``owner/name[@revision]`` named by a config field, and its files in the cache."""

    def __init__(self, name: str, field: str, cache_dir, wanted):
        repo_id, at, revision = name.partition("@")
        if not _REPO_ID.fullmatch(repo_id) or (at and not revision):
            raise HubError(f"{field}: path '{name}' does not exist "
                           "(and it is no hub id 'owner/name[@revision]')")
        self.name, self.field, self.repo_id = name, field, repo_id
        self.revision = revision or "main"
        self.cache_dir = os.fspath(cache_dir or constants.HF_HUB_CACHE)
        self.wanted = wanted  # the files the fetch command in error messages names
        self.downloaded = False  # whether file() had to download

    def file(self, alternatives) -> str:
        """Local path of the first of ``alternatives`` that the cache holds, else of the
        first that the hub has (downloaded unless offline). Raises HubError when
        neither has one."""
        for filename in alternatives:
            cached = try_to_load_from_cache(self.repo_id, filename, self.cache_dir, self.revision)
            if isinstance(cached, str):
                return cached
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            try:
                path = self.download(alternatives)
            except LocalEntryNotFoundError:
                reason = "the hub is unreachable"
            else:
                if path is None:
                    raise HubError(f"{self.field}: hub model {self.repo_id} (revision {self.revision}) "
                                   f"has no {' or '.join(alternatives)}")
                self.downloaded = True
                return path
        revision = "" if self.revision == "main" else f" --revision {self.revision}"
        folder = os.path.join(self.cache_dir, "models--" + self.repo_id.replace("/", "--"))
        raise HubError(
            f"{self.field}: '{self.name}' is no existing path, and hub model {self.repo_id} "
            f"(revision {self.revision}) has no {' or '.join(alternatives)} in the hub cache {self.cache_dir} "
            f"while {reason}; on an online machine run `hf download {self.repo_id}{revision} "
            f"{' '.join(self.wanted)}` and copy the {os.path.basename(folder)} folder of its hub cache to {folder}")

    def weights(self, alternatives) -> str:
        """``file`` of ``alternatives``, each also as a sharded checkpoint's index (then its shards too); the revision is
        then pinned to that file's commit (the other files from the same one)."""
        path = self.file(tuple(name for file in alternatives for name in (file, SHARDED.get(file)) if name))
        self.revision = os.path.basename(os.path.dirname(path))
        shards = []
        if path.endswith(".index.json"):
            with contextlib.suppress(WeightError):  # a bad index: the loader says so
                shards = shard_files(path)
        for shard in shards:
            self.file((shard,))
        return path

    def download(self, alternatives) -> str | None:
        """Path of the first of ``alternatives`` that the hub has, downloaded into the cache;
        None when it has none. LocalEntryNotFoundError when the hub is unreachable."""
        self.reach(alternatives[0])
        for filename in alternatives:
            try:
                return hf_hub_download(self.repo_id, filename, revision=self.revision, cache_dir=self.cache_dir)
            except RemoteEntryNotFoundError:
                continue
            except RevisionNotFoundError:
                raise HubError(f"{self.field}: hub model {self.repo_id} has no revision '{self.revision}'") from None
            except RepositoryNotFoundError:
                raise HubError(f"{self.field}: '{self.name}' is neither an existing path nor a hub model "
                               "(for a gated or private one, log in with `hf auth login`)") from None
        return None

    def reach(self, filename) -> None:
        """Raises LocalEntryNotFoundError at once when the hub cannot be reached: hf_hub_download
        would retry for ~25 s, logging every attempt. One request, no retry; HTTP errors are left
        to the download."""
        try:
            get_hf_file_metadata(hf_hub_url(self.repo_id, filename, revision=self.revision))
        except HfHubHTTPError:  # An answer (no such repository or file, gated...): the download says which.
            pass
        except Exception as error:  # No answer: the HTTP client's connection, timeout or TLS errors.
            raise LocalEntryNotFoundError(f"hub unreachable: {error}") from None
