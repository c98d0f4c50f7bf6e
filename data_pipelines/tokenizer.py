"""Tokenizers: a byte-level BPE trained on the corpus, a Hugging Face tokenizer.json, or a
SentencePiece model (such as LLaMA's tokenizer.model, which OpenELM uses).

`TextTokenizer` wraps either kind behind one small interface and pickles as its
serialized bytes, so tokenizer actors on any node rebuild it without shared files.
BPE special tokens follow OpenELM's ids: <unk> 0, <s> (BOS) 1, </s> (EOS) 2.
"""

import hashlib
from pathlib import Path
from typing import Iterable

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, BOS, EOS]
FILE_NAMES = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}


def find_tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer file in a directory (a Hugging Face model's, a prepared dataset's), if any."""
    return next((Path(directory, n) for n in FILE_NAMES.values() if Path(directory, n).is_file()), None)


class TextTokenizer:
    def __init__(self, kind: str, payload: bytes):
        if kind not in FILE_NAMES:
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        self.kind, self.payload = kind, payload
        self._impl, self._vocab_size = None, None

    # Pickle only the serialized tokenizer; the native object is rebuilt lazily.
    def __getstate__(self):
        return {"kind": self.kind, "payload": self.payload}

    def __setstate__(self, state):
        self.__init__(state["kind"], state["payload"])

    @property
    def impl(self):
        if self._impl is None:
            if self.kind == "hf":
                from tokenizers import Tokenizer

                self._impl = Tokenizer.from_str(self.payload.decode())
            else:
                import sentencepiece as spm

                self._impl = spm.SentencePieceProcessor(model_proto=self.payload)
        return self._impl

    @property
    def vocab_size(self) -> int:
        """Ids run below this: a tokenizer.json may leave gaps in its ids, so its count of tokens can be
        less than its highest id + 1, which the shards' integer type and the model's embedding must hold."""
        if self.kind == "sentencepiece":
            return self.impl.get_piece_size()
        if self._vocab_size is None:
            ids = self.impl.get_vocab(with_added_tokens=True).values()
            self._vocab_size = max(self.impl.get_vocab_size(), max(ids, default=-1) + 1)
        return self._vocab_size

    def special_ids(self) -> tuple[int, int]:
        """(BOS, EOS): packing puts them around every document."""
        if self.kind == "hf":
            bos, eos = self.impl.token_to_id(BOS), self.impl.token_to_id(EOS)
        else:
            bos, eos = self.impl.bos_id(), self.impl.eos_id()
        if bos is None or eos is None or bos < 0 or eos < 0:
            which = f"no {BOS} or {EOS} token" if self.kind == "hf" else "no BOS or EOS id (bos_id/eos_id -1)"
            raise ValueError(f"it has {which}, which packing puts around every document: use a tokenizer that "
                             f"defines them")
        return bos, eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self.impl.encode_batch(texts, add_special_tokens=False)]
        return self.impl.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.impl.decode(ids)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    def vocabulary(self) -> dict[str, int]:
        """Token -> id: what ties a model's embedding rows to text (two files can serialize one tokenizer)."""
        if self.kind == "hf":
            return self.impl.get_vocab(with_added_tokens=True)
        return {self.impl.id_to_piece(i): i for i in range(self.impl.get_piece_size())}

    def same_ids_as(self, other: "TextTokenizer") -> bool:
        """One file, or the same vocabulary saved otherwise (re-saved by transformers, say)."""
        return self.fingerprint == other.fingerprint or self.vocabulary() == other.vocabulary()

    @property
    def file_name(self) -> str:
        return FILE_NAMES[self.kind]

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.file_name
        path.write_bytes(self.payload)
        return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer("hf", tokenizer.to_str().encode())


def load_tokenizer(path: str | Path, kind: str | None = None) -> TextTokenizer:
    """A tokenizer.json (Hugging Face) or a SentencePiece .model, by kind or file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found")
    kind = kind or ("sentencepiece" if path.suffix == ".model" else "hf")
    tokenizer = TextTokenizer(kind, path.read_bytes())
    try:
        tokenizer.vocab_size
    except Exception as e:  # the native libraries raise their own types on bad files
        raise ValueError(f"cannot load {kind} tokenizer {path}: {e}") from None
    return tokenizer
