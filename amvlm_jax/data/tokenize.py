"""Report tokenisation with word-piece to word bookkeeping (SPEC section 2).

Host-side only (numpy). The model side sums word pieces into words with
``amvlm_jax.models.bert.aggregate_words`` using the ``word_index`` computed here.

Word rule: [CLS] is not a word; a token whose text starts with "##" joins the
previous word; every other token starts a new word; [SEP] is a word of its
own and ends the report; slots after it are padding (word_mask 0).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from amvlm_jax.weights import WeightError


class ReportTokenizer:
    """BERT word-piece tokenizer built from a local tokenizer directory.

    ``directory`` must hold ``tokenizer.json`` or ``vocab.txt`` (lower-casing
    then follows ``tokenizer_config.json``'s ``do_lower_case``, default True).
    Nothing is downloaded; a missing or unreadable file raises a one-line
    ``WeightError`` naming it.

    ``__call__(reports)`` returns numpy arrays, with L = max_length and
    W = max_length - 1 word slots:
      ``input_ids``, ``attention_mask``, ``token_type_ids``  (B, L) int32
      ``word_index``  (B, L) int32 in [0, W]; W marks CLS/padding (dropped)
      ``word_mask``   (B, W) float32, 1 for real words ([SEP] included)
    """

    def __init__(self, directory, max_length: int = 20):
        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        self.directory = os.fspath(directory)
        self.max_length = int(max_length)
        self.num_words = self.max_length - 1
        self._tokenizer = _load_backend(self.directory)
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self.pad_id = self._token_id("[PAD]")
        self.cls_id = self._token_id("[CLS]")
        self.sep_id = self._token_id("[SEP]")
        self._tokenizer.enable_padding(length=self.max_length, pad_id=self.pad_id,
                                       pad_token="[PAD]")
        probe = self._tokenizer.encode("a").ids  # Word slots start after [CLS] and end at [SEP] (SPEC 2).
        if probe[0] != self.cls_id or self.sep_id not in probe:
            raise WeightError(f"{self.directory}: its tokenizer puts no [CLS] ... [SEP] around a report (tokenizer.json "
                              "without BERT's post-processor?); the text encoder reads them")

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise WeightError(f"{self.directory}: vocabulary has no {token} token")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def __call__(self, reports: Sequence[str]) -> Dict[str, np.ndarray]:
        if isinstance(reports, str):
            raise TypeError("ReportTokenizer expects a list of reports, not one string")
        encodings = self._tokenizer.encode_batch([str(r) for r in reports])
        batch = len(encodings)
        out = {
            "input_ids": np.zeros((batch, self.max_length), np.int32),
            "attention_mask": np.zeros((batch, self.max_length), np.int32),
            "token_type_ids": np.zeros((batch, self.max_length), np.int32),
            "word_index": np.full((batch, self.max_length), self.num_words, np.int32),
            "word_mask": np.zeros((batch, self.num_words), np.float32),
        }
        for row, enc in enumerate(encodings):
            out["input_ids"][row] = enc.ids
            out["attention_mask"][row] = enc.attention_mask
            out["token_type_ids"][row] = enc.type_ids
            index = word_index_from_tokens(enc.tokens, enc.ids, self.cls_id, self.sep_id,
                                           self.pad_id, self.num_words)
            out["word_index"][row] = index
            count = int(index[index < self.num_words].max(initial=-1)) + 1
            out["word_mask"][row, :count] = 1.0
        return out


def word_index_from_tokens(tokens: List[str], ids: Sequence[int], cls_id: int, sep_id: int,
                           pad_id: int, num_words: int) -> np.ndarray:
    """Maps each token of one sequence to its word slot (num_words = dump slot).

    tokens/ids (L,) -> (L,) int32.
    """
    index = np.full(len(ids), num_words, np.int32)
    word = -1
    for position, (text, token_id) in enumerate(zip(tokens, ids)):
        if token_id == cls_id or token_id == pad_id:
            continue
        if text.startswith("##") and word >= 0 and token_id != sep_id:
            index[position] = word
            continue
        word += 1
        if word >= num_words:
            break
        index[position] = word
        if token_id == sep_id:
            break
    return index


def _load_backend(directory: str):
    """A ``tokenizers.Tokenizer`` from tokenizer.json, else from vocab.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    tokenizer_json = os.path.join(directory, "tokenizer.json")
    vocab_txt = os.path.join(directory, "vocab.txt")
    if os.path.isfile(tokenizer_json):
        file, load = tokenizer_json, Tokenizer.from_file
    elif os.path.isfile(vocab_txt):
        # The wrapper's underlying Tokenizer carries the BERT pre/post-processing.
        lowercase = _lowercase(os.path.join(directory, "tokenizer_config.json"))
        file, load = vocab_txt, lambda path: BertWordPieceTokenizer(path, lowercase=lowercase)._tokenizer
    else:
        raise WeightError(f"{directory}: neither tokenizer.json nor vocab.txt found")
    try:
        return load(file)
    except Exception as error:  # tokenizers raises bare Exceptions (TypeError for a vocabulary without [SEP])
        raise WeightError(f"{file}: unreadable ({error})") from None


def _lowercase(settings: str) -> bool:
    """tokenizer_config.json's do_lower_case (True when the file or the key is absent)."""
    if not os.path.isfile(settings):
        return True
    try:
        with open(settings, encoding="utf-8") as f:
            return bool(json.load(f).get("do_lower_case", True))
    except (ValueError, AttributeError) as error:  # not JSON, not UTF-8, not an object
        raise WeightError(f"{settings}: not a JSON object ({error})") from None
