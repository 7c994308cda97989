"""Looking at a model's word vectors: nearest neighbours, analogies, similarity, a 2-D picture, and the two
standard benchmarks (Google analogies, WordSim-353), scored exactly as gensim scores them.

    lmlab inspect embeddings CKPT --neighbors king
    lmlab inspect embeddings CKPT --analogy man king woman          (man : king :: woman : ?  ->  queen)
    lmlab inspect embeddings CKPT --eval-analogies questions-words.txt --eval-similarity wordsim353.tsv

The vectors are a word2vec model's input vectors, or the input (token) embedding of any other lmlab
model; for a subword tokenizer (BPE, chars) the "words" are its tokens: a word that is not a single
token has no vector here. Every score is the cosine of unit vectors. An analogy ``a : b :: c : ?`` is
answered by 3CosAdd, the word closest to b - a + c (of unit vectors), a, b and c excluded (Mikolov et
al. 2013; gensim's most_similar(positive=[b, c], negative=[a])).

The benchmarks follow gensim's ``evaluate_word_analogies`` and ``evaluate_word_pairs``: words compared
case-insensitively (a word stands for its most frequent casing), only the ``restrict`` most frequent
words count (candidates and questions), a question or pair with a word outside them is skipped and
counted as out of vocabulary. Word order is the tokenizer's id order, which for lmlab's word tokenizer is
descending frequency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmlab.data.tokenizer import EOS, UNK, Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.runs import check_page_output, read_text_file

ANALOGY_TOP = 5  # gensim takes the first of its top 5 answers that is an allowed word and not a question word


def input_embedding(model: nn.Module) -> torch.Tensor:
    """The (vocab, dim) input embedding of an lmlab model: a word2vec model's input vectors, else the
    first embedding table with one row per token (the token embedding of every family, heads included)."""
    vocab = model.config.vocab_size
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module.weight.detach()
    raise DataError(f"the model has no embedding table of {vocab} rows")


@dataclass
class Neighbour:
    """A word and its cosine score."""

    word: str
    score: float


class EmbeddingSpace:
    """Unit-length word vectors with the words they belong to; every query is one matrix product.

    ``vectors`` (V, D); ``words`` the V token strings; ``allowed`` the ids that may be answers and be
    looked up (real words: not <unk>, <eos>, special tokens, or words training never saw), in frequency
    order; ``subword`` says whether the tokens are pieces of words (then messages say "token").
    """

    def __init__(self, vectors: np.ndarray, words: list[str], allowed: np.ndarray, subword: bool = False):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.unit = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)  # (V, D)
        self.words, self.allowed, self.subword = words, np.asarray(allowed, dtype=np.int64), subword
        self.index = {}
        for i in self.allowed[::-1]:  # the most frequent of equal spellings wins
            self.index[words[i]] = int(i)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Tokenizer, manifest: dict | None = None) -> "EmbeddingSpace":
        """The input embedding of ``model`` with its tokenizer's tokens; a word2vec checkpoint's ``manifest``
        says which ids training kept (the rest are left out)."""
        vectors = input_embedding(model).float().cpu().numpy()
        words = [tokenizer.tk.id_to_token(i) or "" for i in range(len(vectors))]
        subword = tokenizer.kind != "word"
        if subword:  # show and look up tokens as text: byte-level BPE's "Ġking" is " king"
            words = [tokenizer.decode([i]).strip() or w for i, w in enumerate(words)]
        excluded = set(tokenizer.special_ids) | {tokenizer.tk.token_to_id(t) for t in (UNK, EOS)}
        limit = ((manifest or {}).get("word2vec") or {}).get("trained_below", len(vectors))
        allowed = [i for i in range(min(limit, len(vectors), tokenizer.vocab_size)) if i not in excluded and words[i]]
        return cls(vectors, words, np.array(allowed), subword)

    # ------------------------------------------------------------------------------------------
    # queries

    def id_of(self, word: str) -> int:
        """The id of ``word``, or a one-line DataError saying it has no vector."""
        if word in self.index:
            return self.index[word]
        what = "token (words split into several tokens have no vector of their own)" if self.subword else "word"
        raise DataError(f"{word!r} is not a known {what}")

    def neighbors(self, word: str, k: int = 10) -> list[Neighbour]:
        """The ``k`` words of highest cosine similarity to ``word`` (itself excluded)."""
        return self._nearest(self.unit[self.id_of(word)], k, exclude=[self.id_of(word)])

    def analogy(self, a: str, b: str, c: str, k: int = 10) -> list[Neighbour]:
        """``a : b :: c : ?``: the ``k`` words closest to unit(b) - unit(a) + unit(c), a, b, c excluded."""
        ids = [self.id_of(w) for w in (a, b, c)]
        return self._nearest(self._offset(*ids), k, exclude=ids)

    def similarity(self, first: str, second: str) -> float:
        """The cosine similarity of two words."""
        return float(self.unit[self.id_of(first)] @ self.unit[self.id_of(second)])

    def _offset(self, a: int, b: int, c: int) -> np.ndarray:
        """unit(b) - unit(a) + unit(c), normalised (gensim's mean of the signed unit vectors)."""
        query = self.unit[b] - self.unit[a] + self.unit[c]
        return query / max(float(np.linalg.norm(query)), 1e-12)

    def _nearest(self, query: np.ndarray, k: int, exclude: list[int], allowed: np.ndarray | None = None
                 ) -> list[Neighbour]:
        """The ``k`` allowed ids of highest cosine with ``query`` (D,), ``exclude`` left out."""
        allowed = self.allowed if allowed is None else allowed
        scores = self.unit[allowed] @ query  # (A,)
        scores[np.isin(allowed, exclude)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        return [Neighbour(self.words[allowed[i]], float(scores[i])) for i in top if np.isfinite(scores[i])]

    # ------------------------------------------------------------------------------------------
    # benchmarks

    def _vocab(self, restrict: int, case_insensitive: bool) -> tuple[dict[str, int], np.ndarray]:
        """The ``restrict`` most frequent allowed words: (spelling -> id, its most frequent casing
        when case-insensitive; the ids)."""
        ids = self.allowed[:restrict]
        key = str.upper if case_insensitive else str
        return {key(self.words[i]): int(i) for i in ids[::-1]}, ids

    def evaluate_analogies(self, path: str | Path, restrict: int = 30000,
                           case_insensitive: bool = True) -> dict:
        """Accuracy on a Google analogy file (``: section`` lines, then ``a b c d`` per line: a : b :: c : d),
        per section and in total, as gensim's evaluate_word_analogies computes it (see the module
        docstring); questions with a word outside the ``restrict`` most frequent are skipped."""
        vocab, ids = self._vocab(restrict, case_insensitive)
        key = str.upper if case_insensitive else str
        sections, asked, skipped, questions = [], [], 0, 0  # asked: (section number, [a, b, c, d] spelled by key)
        for number, line in enumerate(read_text_file(path, "analogy").splitlines(), 1):
            if line.startswith(": "):
                sections.append({"section": line[2:].strip(), "correct": 0, "total": 0})
                continue
            parts = [key(w) for w in line.split()]
            if len(parts) != 4:
                continue  # a blank or malformed line (gensim skips them too)
            if not sections:
                raise DataError(f"{path}:{number}: a question before the first ': section' line")
            questions += 1
            if any(p not in vocab for p in parts):
                skipped += 1
                continue
            asked.append((len(sections) - 1, parts))
        if not questions:
            raise DataError(f"{path}: no analogy questions (lines 'a b c d' under ': section' headers)")
        answers = self._top_answers([[vocab[p] for p in parts[:3]] for _, parts in asked], ids)
        for (section, parts), top in zip(asked, answers):
            sections[section]["total"] += 1
            sections[section]["correct"] += _first_allowed(top, parts, vocab, key) == parts[3]
        for s in sections:
            s["accuracy"] = s["correct"] / s["total"] if s["total"] else None
        correct, total = sum(s["correct"] for s in sections), sum(s["total"] for s in sections)
        return {"accuracy": correct / total if total else None, "correct": correct, "total": total,
                "questions": questions, "oov": skipped, "oov_ratio": skipped / questions, "restrict": restrict,
                "sections": [s for s in sections if s["total"]]}

    def _top_answers(self, questions: list[list[int]], ids: np.ndarray, chunk: int = 512) -> list[list[str]]:
        """For each question [a, b, c] (ids), the ANALOGY_TOP words of ``ids`` closest to b - a + c, a, b, c
        excluded: a chunk of questions at a time, one matrix product each."""
        position = {int(i): p for p, i in enumerate(ids)}
        candidates = self.unit[ids].T  # (D, A)
        found = []
        for start in range(0, len(questions), chunk):
            block = np.array(questions[start:start + chunk])  # (Q, 3)
            queries = self.unit[block[:, 1]] - self.unit[block[:, 0]] + self.unit[block[:, 2]]  # (Q, D)
            queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
            scores = queries @ candidates  # (Q, A)
            for row, question in enumerate(block):
                scores[row, [position[int(i)] for i in question]] = -np.inf
            k = min(ANALOGY_TOP, scores.shape[1])
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            found += [[self.words[ids[p]] for p in row] for row in np.take_along_axis(top, order, axis=1)]
        return found

    def evaluate_similarity(self, path: str | Path, restrict: int = 300000, case_insensitive: bool = True) -> dict:
        """Spearman (and Pearson) correlation of the cosine similarities with human scores of a
        ``word<TAB>word<TAB>score`` file (WordSim-353; ``#`` lines are comments), pairs with a word outside
        the ``restrict`` most frequent skipped (``oov_ratio``: their share), as gensim's evaluate_word_pairs."""
        vocab, _ = self._vocab(restrict, case_insensitive)
        key = str.upper if case_insensitive else str
        gold, model, oov = [], [], 0
        for line in read_text_file(path, "word-pair").splitlines():
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            try:
                a, b, score = key(fields[0]), key(fields[1]), float(fields[2])
            except (IndexError, ValueError):
                continue  # a malformed line (gensim skips them too)
            if len(fields) != 3:
                continue
            if a not in vocab or b not in vocab:
                oov += 1
                continue
            gold.append(score)
            model.append(float(self.unit[vocab[a]] @ self.unit[vocab[b]]))
        if not gold:
            raise DataError(f"{path}: no word pair with both words known (of {oov} pairs)")
        return {"spearman": spearman(gold, model), "pearson": float(np.corrcoef(gold, model)[0, 1]),
                "pairs": len(gold), "oov": oov, "oov_ratio": oov / (len(gold) + oov)}

    # ------------------------------------------------------------------------------------------
    # a picture

    def plot(self, words: list[str], out: str | Path, title: str = "word vectors (PCA)") -> Path:
        """A PNG of ``words`` projected on the first two principal components of their vectors, labelled."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lmlab.runs import atomic_file

        if len(words) < 2:
            raise DataError("--plot needs at least two words")
        points = project_2d(self.unit[[self.id_of(w) for w in words]])
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter(points[:, 0], points[:, 1], s=12)
        for (x, y), word in zip(points, words):
            ax.annotate(word, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        fig.tight_layout()
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return Path(out)


def _first_allowed(answers: list[str], question: list[str], vocab: dict[str, int], key) -> str | None:
    """gensim's answer to an analogy: the first of the top ``answers`` that is a counted word and none of
    the question's a, b, c (compared as spelled by ``key``); else the last answer."""
    predicted = None
    for word in answers:
        predicted = key(word)
        if predicted in vocab and predicted not in question[:3]:
            break
    return predicted


def project_2d(vectors: np.ndarray) -> np.ndarray:
    """(N, 2): the rows of ``vectors`` (N, D) on their first two principal components (SVD of the centred rows)."""
    centred = vectors - vectors.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (scipy's spearmanr: ties given their mean rank); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def inspect_embeddings(space: EmbeddingSpace, neighbors: list[str] = (), analogy: list[str] | None = None,
                       similarity: list[str] | None = None, plot: list[str] = (), plot_out: str | None = None,
                       eval_analogies: str | None = None, eval_similarity: str | None = None, top_k: int = 10,
                       restrict: int = 30000) -> dict:
    """What ``lmlab inspect embeddings`` asks of ``space``, as one report: the neighbours of each word in
    ``neighbors``, the answers to ``analogy`` [a, b, c] (a : b :: c : ?), the cosine of ``similarity``
    [w1, w2], a PCA picture of the words ``plot`` written to ``plot_out``, and the scores on an analogy
    file and a word-pair file. Unknown words and missing options fail before any work."""
    if not (neighbors or analogy or similarity or plot or eval_analogies or eval_similarity):
        raise ConfigError("nothing to do: give --neighbors, --analogy, --similarity, --plot, --eval-analogies "
                          "or --eval-similarity")
    if top_k < 1 or restrict < 1:
        raise ConfigError(f"--top-k and --restrict-vocab must be at least 1, got {top_k} and {restrict}")
    if bool(plot) != bool(plot_out):
        raise ConfigError("--plot WORD... and -o OUT.png go together")
    if plot_out:
        check_page_output(plot_out, ".png")  # not a folder, nor a file of the user's that is not a picture
    for word in [*neighbors, *(analogy or []), *(similarity or []), *plot]:
        space.id_of(word)
    report: dict = {}
    if plot:
        report["plot"] = str(space.plot(list(plot), plot_out))
    if neighbors:
        report["neighbors"] = {w: [vars(n) for n in space.neighbors(w, top_k)] for w in neighbors}
    if analogy:
        a, b, c = analogy
        report["analogy"] = {"question": f"{a} : {b} :: {c} : ?",
                             "answers": [vars(n) for n in space.analogy(a, b, c, top_k)]}
    if similarity:
        report["similarity"] = {"words": list(similarity), "cosine": space.similarity(*similarity)}
    if eval_analogies:
        report["analogies"] = {"file": str(eval_analogies), **space.evaluate_analogies(eval_analogies, restrict)}
    if eval_similarity:
        report["word_pairs"] = {"file": str(eval_similarity), **space.evaluate_similarity(eval_similarity)}
    return report


def report_markdown(report: dict, title: str = "Word embeddings") -> str:
    """``inspect_embeddings``'s report as Markdown tables."""
    lines = [f"# {title}", ""]
    for word, found in report.get("neighbors", {}).items():
        lines += [f"Nearest to **{word}**:", "", "| word | cosine |", "|---|---|"]
        lines += [f"| {n['word']} | {n['score']:.4f} |" for n in found] + [""]
    if "analogy" in report:
        lines += [f"Analogy {report['analogy']['question']} (3CosAdd):", "", "| word | cosine |", "|---|---|"]
        lines += [f"| {n['word']} | {n['score']:.4f} |" for n in report["analogy"]["answers"]] + [""]
    if "similarity" in report:
        first, second = report["similarity"]["words"]
        lines += [f"cos({first}, {second}) = {report['similarity']['cosine']:.4f}", ""]
    if "analogies" in report:
        a = report["analogies"]
        lines += [f"Analogies ({a['file']}, top {a['restrict']:,} words; {a['oov']:,} of {a['questions']:,} "
                  f"questions skipped as out of vocabulary):", "", "| section | correct | total | accuracy |",
                  "|---|---|---|---|"]
        lines += [f"| {s['section']} | {s['correct']} | {s['total']} | {s['accuracy']:.4f} |" for s in a["sections"]]
        total = "n/a" if a["accuracy"] is None else f"{a['accuracy']:.4f}"
        lines += [f"| **total** | {a['correct']} | {a['total']} | {total} |", ""]
    if "word_pairs" in report:
        w = report["word_pairs"]
        lines += [f"Word pairs ({w['file']}): Spearman {w['spearman']:.4f}, Pearson {w['pearson']:.4f} over "
                  f"{w['pairs']} pairs; out of vocabulary {w['oov']} ({w['oov_ratio']:.1%})", ""]
    return "\n".join(lines)
