"""Configuration of the seeds stage: the seed sources, chunking, dedup, and where reading runs."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from pipeline.records import SourceKind

# File extensions per programming language (code sources pick languages by name).
LANGUAGE_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "python": (".py", ".pyi"),
    "c": (".c", ".h"),
    "cpp": (".cc", ".cpp", ".cxx", ".hpp", ".hh"),
    "javascript": (".js", ".mjs", ".cjs"),
    "typescript": (".ts", ".tsx"),
    "rust": (".rs",),
    "go": (".go",),
    "java": (".java",),
    "shell": (".sh", ".bash"),
    "ruby": (".rb",),
    "perl": (".pl", ".pm"),
}


class SeedSource(BaseModel):
    """One seed corpus: files matched by globs, a `datasets` dataset, or a Python attribute."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: SourceKind
    """web: HTML pages (main text extracted); web_qa: question/answer pairs (JSONL, JSON, Parquet, a
    `datasets` dataset, or a plain-text FAQ of 'Q:'/'A:' blocks); code: source files by language;
    book: long plain-text/markdown/reST documents chunked at section and paragraph bounds. Every kind
    also reads files of records (`.jsonl`, `.jsonl.gz`, `.parquet`), one document per row."""
    name: str | None = None
    """Label used in logs, errors and the `source` field; default: kind plus the first path/dataset."""
    paths: list[str] = Field(default_factory=list)
    """Glob patterns (`**` recurses; `.gz` files are read transparently). Placeholders: {stdlib}
    (this Python's standard library folder), {purelib} (site-packages). Each real file is read once,
    however many links or patterns lead to it."""
    follow_symlinks: bool = True
    """Follow symbolic links met while expanding the globs (a link to a folder or file already read,
    such as a link to a parent folder, is skipped and counted, never read twice). False: skip them."""
    dataset: str | None = None
    """A `datasets` dataset: a folder written by `save_to_disk`, or a name for `datasets.load_dataset`
    (needs the Hub or a local cache: no network at run time here)."""
    dataset_config: str | None = None
    """Configuration name passed to `datasets.load_dataset`."""
    split: str = "train"
    """Split of `dataset` to read."""
    module: str | None = None
    """A Python attribute 'package.module:attr' holding a str or a dict of title -> text (e.g.
    'pydoc_data.topics:topics', the reference topics CPython's help() shows)."""
    license: str = "unknown"
    """Licence of the text, carried on every seed record (e.g. 'PSF-2.0', 'CC-BY-SA-4.0')."""
    text_field: str = "text"
    """Field holding the document (HTML for web) in JSONL/Parquet/dataset rows."""
    question_field: str = "question"
    """web_qa: field with the question (dotted path for nested fields, e.g. 'q.body')."""
    answer_field: str = "answer"
    """web_qa: field with the answer (a list takes its first element, as in SQuAD's answers.text)."""
    languages: list[str] = Field(default_factory=lambda: ["python"])
    """code: languages to keep (keys of LANGUAGE_EXTENSIONS); other files are ignored."""
    skip_vendored: bool = True
    """code: skip files under vendor/, third_party/, node_modules/, site-packages/, build/ ..."""
    skip_generated: bool = True
    """code: skip files whose first lines say they are generated ('Auto-generated', 'DO NOT EDIT')."""
    max_files: int | None = Field(None, ge=1)
    """Read at most this many matched files (sorted by path)."""
    max_document_bytes: int = Field(8_000_000, ge=1,
                                    validation_alias=AliasChoices("max_document_bytes", "max_file_bytes"))
    """Largest single document: a text, HTML or code file, or one record of a file of records (a JSONL
    line, a Parquet or dataset row). Larger ones are skipped and counted. Files of records are read
    streaming and never rejected for their total size. (Old name: max_file_bytes.)"""
    max_line_chars: int = Field(20_000, ge=80)
    """Lines of text, book and code files longer than this (minified code, base64 blobs) are skipped and
    counted. HTML pages are exempt: a whole page on one line is common."""
    max_chunks: int | None = Field(None, ge=1)
    """Keep at most this many chunks of this source after dedup (a seeded spread sample)."""

    def label(self) -> str:
        if self.name:
            return self.name
        first = self.dataset or self.module or (self.paths[0] if self.paths else "?")
        return f"{self.kind}:{first}"


def default_sources() -> list[SeedSource]:
    """The embedded default: one real source of each kind (see the package docstring)."""
    return [
        SeedSource(kind="web", name="cpython-idle-docs", paths=["{stdlib}/idlelib/help.html"],
                   license="PSF-2.0", max_chunks=6),
        SeedSource(kind="web_qa", name="xz-utils-faq", paths=["/usr/share/doc/xz-utils/faq.txt.gz"],
                   license="public-domain", max_chunks=6),
        SeedSource(kind="code", name="cpython-stdlib", license="PSF-2.0", max_chunks=6, paths=[
            "{stdlib}/textwrap.py", "{stdlib}/heapq.py", "{stdlib}/bisect.py", "{stdlib}/statistics.py",
            "{stdlib}/fractions.py", "{stdlib}/colorsys.py", "{stdlib}/json/*.py", "{stdlib}/shlex.py"]),
        SeedSource(kind="book", name="cpython-reference-topics", module="pydoc_data.topics:topics",
                   license="PSF-2.0", max_chunks=6),
    ]


class SeedsConfig(BaseModel):
    """Seed corpora, chunking and dedup."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    sources: list[SeedSource] = Field(default_factory=default_sources, min_length=1)
    """Seed corpora (each a web, web_qa, code or book source). Default: real text from CPython and Debian."""
    tokenizer: str = "smollm2-135m-instruct"
    """Tokenizer that measures chunks: the embedded name or folder of the model that reads the seeds."""
    chunk_tokens: int = Field(320, ge=32)
    """Token budget of one chunk (kept small: the generator's prompt holds the chunk plus instructions)."""
    min_chunk_tokens: int = Field(24, ge=1)
    """Chunks shorter than this (stray headings, one-line files) are dropped and counted."""
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity (MinHash over word 3-grams) at which a chunk counts as a near
    duplicate of an earlier one and is dropped. None: exact duplicates only."""
    max_seeds: int | None = Field(None, ge=1)
    """Cap on the total number of seeds (after each source's max_chunks), a seeded sample."""
    reader: Literal["auto", "driver", "ray_data"] = "auto"
    """Where files are read, decoded, extracted and chunked: in this process (driver), or on the Ray
    cluster with Ray Data (ray_data: each file, Parquet row group or slice of a dataset is a task;
    dedup keys are grouped across blocks). Both give the same seeds with the same ids. auto: ray_data
    when the matched files add up to at least ray_data_min_bytes."""
    ray_data_min_bytes: int = Field(1_000_000_000, ge=1)
    """reader auto: total size of the matched input files from which reading moves to Ray Data."""
