"""Text corpora for perplexity, by name or path, in one registry.

Hub corpora (WikiText-2, C4, PG-19) load through ``datasets`` when the hub is
reachable; the offline corpora are real text that registry packages ship.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from massquant.errors import UserError
from massquant.models.cache import cache_home

# Whether a sequence starts with BOS: auto (when the tokenizer has one), always, never.
BOS_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    load: Callable[[], str]
    offline: bool


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this corpus needs the package '{package}': {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise UserError(f"package '{package}' is installed but lacks {relative}")
    return path


def _cached(name: str, build: Callable[[], str]) -> str:
    """Corpora that need parsing are built once and kept as plain text."""
    directory = cache_home() / "text"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = build()
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return text


_WIKI_QUOTES = re.compile(r"'{2,}")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _enwiki_sample() -> str:
    dump = _package_file(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "pip install gensim==4.4.0",
    )

    def build() -> str:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        articles = []
        with bz2.open(dump, "rb") as stream:
            for title, markup, _page_id in extract_pages(stream):
                body = _WIKI_QUOTES.sub("", filter_wiki(markup)).strip()
                if body and not markup.lstrip().lower().startswith("#redirect"):
                    articles.append(f"= {title} =\n\n{_BLANK_RUNS.sub(chr(10) * 2, body)}")
        return "\n\n".join(articles)

    return _cached("enwiki-sample", build)


def _lee_news() -> str:
    path = _package_file("gensim", "test/test_data/lee_background.cor", "pip install gensim==4.4.0")
    return "\n\n".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _hub_text(dataset: str, subset: str | None, split: str, field: str, limit: int | None, **kwargs) -> str:
    try:
        import datasets

        rows = datasets.load_dataset(dataset, subset, split=split, **kwargs)
        texts = [row[field] for row in itertools.islice(rows, limit)]
    except Exception as error:  # offline, renamed or gated datasets all surface differently
        offline = ", ".join(name for name, source in TEXT_SOURCES.items() if source.offline)
        raise UserError(
            f"cannot load '{dataset}' from the Hugging Face hub ({type(error).__name__}); "
            f"offline corpora: {offline}, or a path to a .txt file"
        ) from error
    return "\n\n".join(texts)


TEXT_SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource(
            "enwiki-sample",
            "106 Wikipedia articles shipped in gensim's test data (about 720K SmolLM2 tokens), CC BY-SA",
            _enwiki_sample,
            offline=True,
        ),
        TextSource("lee-news", "Lee news corpus from gensim's test data (0.36 MB)", _lee_news, offline=True),
        TextSource(
            "wikitext2",
            "WikiText-2 raw test split, paragraphs joined by blank lines (needs the hub)",
            lambda: _hub_text("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", None),
            offline=False,
        ),
        TextSource(
            "c4",
            "first 1,100 documents of the C4 en validation shard 0 (needs the hub)",
            lambda: _hub_text(
                "allenai/c4",
                None,
                "validation",
                "text",
                1100,
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            ),
            offline=False,
        ),
        TextSource(
            "pg19",
            "first 5 books of the PG-19 test split, streamed (needs the hub)",
            lambda: _hub_text("emozilla/pg19-test", None, "test", "text", 5, streaming=True),
            offline=False,
        ),
    )
}
DEFAULT_TEXT = "enwiki-sample"


def load_text(reference: str) -> str:
    """Text of a named corpus or of a local text file; never empty."""
    if reference in TEXT_SOURCES:
        text = TEXT_SOURCES[reference].load()
    else:
        path = Path(reference).expanduser()
        if not path.is_file():
            raise UserError(
                f"unknown text '{reference}': not a file; named corpora: {', '.join(TEXT_SOURCES)}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"text file '{reference}' is not UTF-8 ({error.reason} at byte {error.start})") from None
        text = text.replace("\r\n", "\n")
    if not text.strip():
        raise UserError(f"text '{reference}' is empty")
    return text


def text_fingerprint(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
