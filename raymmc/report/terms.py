"""Top terms of each cluster's captions by class-based TF-IDF (c-TF-IDF).

All captions of a cluster are concatenated into one document, so the "documents" are the
clusters. The weight of term t in cluster c is

    W[c, t] = tf[c, t] * log(1 + A / f[t])

with tf[c, t] the count of t in cluster c's captions, f[t] the count of t over all clusters and
A the average number of (counted) words per cluster. A term frequent in one cluster and rare
elsewhere scores high; a term spread evenly over all clusters scores low.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

# Words of two or more letters: digits and one-letter tokens rarely describe a cluster.
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"


def analyzer(stop_words: str | list[str] | None = "english", token_pattern: str = TOKEN_PATTERN
             ) -> Callable[[str], list[str]]:
    """The tokenizer c-TF-IDF counts with (lower case, stop words removed): for counting terms block by block."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(stop_words=stop_words, token_pattern=token_pattern, lowercase=True).build_analyzer()


def ctfidf(cluster_docs: Sequence[str], *, stop_words: str | list[str] | None = "english",
           token_pattern: str = TOKEN_PATTERN) -> tuple[np.ndarray, list[str]]:
    """c-TF-IDF weights ``(n_clusters, n_terms)`` and the vocabulary (sorted), one row per doc.

    ``cluster_docs[c]`` is cluster c's captions joined with spaces. An empty vocabulary (no
    captions, or only stop words) gives a ``(n_clusters, 0)`` matrix rather than an error.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(stop_words=stop_words, token_pattern=token_pattern, lowercase=True)
    try:
        counts = vec.fit_transform(list(cluster_docs))
    except ValueError:  # sklearn: "empty vocabulary"
        return np.zeros((len(cluster_docs), 0)), []
    tf = counts.toarray().astype(np.float64)
    return _weights(tf, tf.sum()), list(vec.get_feature_names_out())


def _weights(tf: np.ndarray, total_words: float) -> np.ndarray:
    """The module doc's W from the (clusters, terms) counts; ``total_words`` over all clusters sets A."""
    avg_words = total_words / max(len(tf), 1)
    return tf * np.log1p(avg_words / tf.sum(axis=0))  # every vocabulary term occurs somewhere: f > 0


def _ranked(weights: np.ndarray, vocab: list[str], n: int) -> list[list[tuple[str, float]]]:
    out: list[list[tuple[str, float]]] = []
    for row in weights:
        # lexsort: last key is primary -> descending weight, then vocabulary order (alphabetical).
        order = np.lexsort((np.arange(len(row)), -row))
        out.append([(vocab[j], float(row[j])) for j in order[:n] if row[j] > 0])
    return out


def top_terms(cluster_docs: Sequence[str], n: int = 8, **kwargs) -> list[list[tuple[str, float]]]:
    """The ``n`` highest-weighted ``(term, weight)`` of each cluster doc, best first.

    Terms absent from a cluster (weight 0) are never listed; ties break alphabetically so the
    report is deterministic.
    """
    weights, vocab = ctfidf(cluster_docs, **kwargs)
    return _ranked(weights, vocab, n)


def top_terms_from_counts(counts: Sequence[Mapping[str, int]], words: Sequence[int] | None = None, n: int = 8
                          ) -> list[list[tuple[str, float]]]:
    """:func:`top_terms` from each cluster's term counts (as :func:`analyzer` counts them), summed where the
    clusters' items are: the same terms and weights as from the joined captions. ``words`` is each cluster's
    total term count when ``counts`` keeps only its most frequent terms (the c-TF-IDF's average length)."""
    vocab = sorted({t for c in counts for t in c})
    if not vocab:
        return [[] for _ in counts]
    col = {t: j for j, t in enumerate(vocab)}
    tf = np.zeros((len(counts), len(vocab)))
    for i, c in enumerate(counts):
        for t, k in c.items():
            tf[i, col[t]] = k
    return _ranked(_weights(tf, float(sum(words)) if words is not None else tf.sum()), vocab, n)
