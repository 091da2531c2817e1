"""Build duplicate-question title pairs from Stack Exchange data dumps, the way the seed model's data was made.

Positives are duplicate links (LinkTypeId 3) between two questions; each gets a random negative pair of
titles from the same site and split that are neither linked nor in the same duplicate cluster. Splits go
by duplicate cluster, so no title appears in two splits. The XML is streamed: memory grows with the number
of questions' titles, never with the size of Posts.xml.
"""

from __future__ import annotations

import functools
import html
import random
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from minilm_sts.atomic import write_file_atomically
from minilm_sts.errors import DumpError

DUPLICATE_LINK = "3"
QUESTION = "1"
SPLITS = ("train", "dev", "test")


@dataclass
class Site:
    name: str
    titles: dict[str, str]  # question id -> normalised title
    links: list[tuple[str, str, str]]  # (post id, related post id, link type)


@dataclass
class Summary:
    sites: list[str] = field(default_factory=list)
    questions: int = 0
    links: int = 0
    duplicate_links: int = 0
    positives: int = 0
    negatives: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_split: dict[str, int] = field(default_factory=dict)
    sites_without_pairs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        splits = ", ".join(f"{split} {n}" for split, n in self.per_split.items())
        return [f"sites: {len(self.sites)} ({', '.join(self.sites)})",
                f"questions with titles: {self.questions}", f"links: {self.links} ({self.duplicate_links} duplicate)",
                f"positives: {self.positives}", f"negatives: {self.negatives}", f"dropped links: {dropped}",
                f"rows per split: {splits}"] + [f"warning: {name} has no usable duplicate links"
                                                for name in self.sites_without_pairs]


def normalise_title(raw: str) -> str:
    return " ".join(html.unescape(raw).split())


def iter_rows(path: Path, progress=None):
    """Attribute dicts of each <row> in a dump file, streamed; each element is cleared once read."""
    if not path.is_file():
        raise DumpError(f"{path}: file not found")
    try:
        for _, element in ET.iterparse(path, events=("end",)):
            if element.tag == "row":
                yield element.attrib
                if progress is not None:
                    progress.update(1)
            element.clear()
    except ET.ParseError as err:
        raise DumpError(f"{path}: malformed XML ({err})") from err


def read_site(folder: Path, progress=None) -> Site:
    folder = Path(folder)
    if not folder.is_dir():
        raise DumpError(f"{folder}: site folder not found")
    for name in ("Posts.xml", "PostLinks.xml"):  # both checked before the long read of Posts.xml
        if not (folder / name).is_file():
            raise DumpError(f"{folder / name}: file not found; a site folder needs Posts.xml and PostLinks.xml")
    titles = {}
    for row in iter_rows(folder / "Posts.xml", progress):
        if row.get("PostTypeId") == QUESTION and row.get("Title", "").strip():
            titles[row["Id"]] = normalise_title(row["Title"])
    links = [(row["PostId"], row["RelatedPostId"], row.get("LinkTypeId", ""))
             for row in iter_rows(folder / "PostLinks.xml", progress)]
    return Site(folder.name, titles, links)


def positives_of(site: Site, summary: Summary) -> list[tuple[str, str]]:
    """Duplicate pairs as (title, title), with the reasons for every dropped link counted."""
    seen: set[frozenset] = set()
    pairs = []
    for post, related, kind in site.links:
        if kind != DUPLICATE_LINK:
            continue
        summary.duplicate_links += 1
        if post not in site.titles or related not in site.titles:
            summary.dropped["link to a missing or non-question post"] += 1
            continue
        a, b = site.titles[post], site.titles[related]
        if a.lower() == b.lower():
            summary.dropped["same title"] += 1
            continue
        key = frozenset((a.lower(), b.lower()))
        if key in seen:
            summary.dropped["repeated pair"] += 1
            continue
        seen.add(key)
        pairs.append((a, b))
    return pairs


class Clusters:
    """Union-find over strings (here lowercased titles): a cluster is a connected component of the duplicate graph."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def assign_splits(positives: list[tuple[str, str, str]], fractions: tuple[float, float, float], rng: random.Random,
                  clusters: Clusters) -> dict[str, str]:
    """Cluster root -> split: clusters are shuffled, then filled into the splits up to their share of positives."""
    size = Counter(clusters.find(a.lower()) for _, a, _ in positives)
    roots = sorted(size)
    rng.shuffle(roots)
    targets = [f * len(positives) for f in fractions]
    filled = [0, 0, 0]
    split_of = {}
    for root in roots:
        index = next((i for i in range(3) if filled[i] + size[root] <= targets[i]),
                     min(range(3), key=lambda i: filled[i] - targets[i]))
        filled[index] += size[root]
        split_of[root] = SPLITS[index]
    return split_of


def build_pairs(site_paths: list[Path], fractions=(0.8, 0.1, 0.1), negatives_per_positive: float = 1.0,
                seed: int = 42, show_progress: bool = True) -> tuple[dict[str, list[tuple]], Summary]:
    """Rows (sentence_0, sentence_1, label, site) per split, and what happened, for the given site dumps."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    from tqdm.auto import tqdm

    rng, summary, clusters = random.Random(seed), Summary(), Clusters()
    positives, linked = [], set()
    with tqdm(desc="Reading dump rows", unit=" rows", disable=not show_progress) as progress:
        sites = [read_site(path, progress) for path in site_paths]
    for site in sites:
        summary.sites.append(site.name)
        summary.questions += len(site.titles)
        summary.links += len(site.links)
        found = positives_of(site, summary)
        if not found:
            summary.sites_without_pairs.append(site.name)
        for a, b in found:
            clusters.union(a.lower(), b.lower())
            positives.append((site.name, a, b))
        linked.update((site.name, frozenset((site.titles[p].lower(), site.titles[r].lower())))
                      for p, r, _ in site.links if p in site.titles and r in site.titles)
    if not positives:
        raise DumpError("no duplicate pairs in any site: nothing to build (see the summary)\n"
                        + "\n".join(summary.lines()))
    split_of = assign_splits(positives, fractions, rng, clusters)
    rows = {split: [] for split in SPLITS}
    for site_name, a, b in positives:
        rows[split_of[clusters.find(a.lower())]].append((a, b, 1.0, site_name))
    summary.positives = len(positives)
    pools = _title_pools(sites, clusters, split_of, fractions, rng)
    used: set = set()
    for split in SPLITS:
        for _, _, _, site_name in list(rows[split]):
            for _ in range(_draw_count(negatives_per_positive, rng)):
                pair = _random_negative(pools[(site_name, split)], site_name, linked, clusters, used, rng)
                if pair is None:
                    summary.dropped["negative not found"] += 1
                    continue
                rows[split].append((*pair, 0.0, site_name))
                summary.negatives += 1
        rng.shuffle(rows[split])
    summary.per_split = {split: len(rows[split]) for split in SPLITS}
    return rows, summary


def _title_pools(sites, clusters: Clusters, split_of: dict, fractions, rng: random.Random) -> dict:
    """Titles per (site, split): a clustered title goes where its cluster went, any other title at random."""
    pools = defaultdict(list)
    for site in sites:
        unique = sorted({title.lower(): title for title in site.titles.values()}.items())
        for key, title in unique:
            split = (split_of[clusters.find(key)] if key in clusters.parent
                     else rng.choices(SPLITS, weights=fractions)[0])
            pools[(site.name, split)].append(title)
    return pools


def _draw_count(rate: float, rng: random.Random) -> int:
    """`rate` negatives per positive on average: the whole part always, the fraction by chance."""
    whole = int(rate)
    return whole + (rng.random() < rate - whole)


def _random_negative(pool: list[str], site: str, linked: set, clusters: Clusters, used: set, rng: random.Random,
                     attempts: int = 100):
    if len(pool) < 2:
        return None
    for _ in range(attempts):
        a, b = rng.sample(pool, 2)
        key = frozenset((a.lower(), b.lower()))
        same_cluster = (a.lower() in clusters.parent and b.lower() in clusters.parent
                        and clusters.find(a.lower()) == clusters.find(b.lower()))
        if len(key) == 2 and key not in used and (site, key) not in linked and not same_cluster:
            used.add(key)
            return a, b
    return None


def write_pairs(rows: dict[str, list[tuple]], out_dir: Path, fmt: str = "tsv", with_site: bool = False) -> list[Path]:
    """One file per split, each written under a temporary name and renamed when complete."""
    if fmt not in PAIR_WRITERS:
        raise ValueError(f"unknown output format {fmt!r}; use {', '.join(PAIR_WRITERS)}")
    columns = ["sentence_0", "sentence_1", "label"] + (["site"] if with_site else [])
    written = []
    for split, split_rows in rows.items():
        records = [row[: len(columns)] for row in split_rows]
        write = PAIR_WRITERS[fmt]
        written.append(write_file_atomically(out_dir / f"{split}.{fmt}", lambda tmp: write(tmp, columns, records)))
    return written


def _write_tsv(path: Path, columns: list[str], records: list[tuple], delimiter: str = "\t") -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(records)


def _write_jsonl(path: Path, columns: list[str], records: list[tuple]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(dict(zip(columns, r)), ensure_ascii=False) + "\n" for r in records)


def _write_parquet(path: Path, columns: list[str], records: list[tuple]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: [r[i] for r in records] for i, c in enumerate(columns)}), path)


PAIR_WRITERS = {"tsv": _write_tsv, "csv": functools.partial(_write_tsv, delimiter=","), "jsonl": _write_jsonl,
                "parquet": _write_parquet}


def build_pairs_command(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m minilm_sts build-pairs",
        description="Duplicate-title pairs (label 1.0) and random negatives (0.0) from Stack Exchange dumps.")
    parser.add_argument("sites", nargs="+", type=Path, help="site folders, each with Posts.xml and PostLinks.xml")
    parser.add_argument("--out", type=Path, required=True, help="folder for train/dev/test files")
    parser.add_argument("--format", default="tsv", choices=["tsv", "jsonl", "parquet"])
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "DEV", "TEST"))
    parser.add_argument("--negatives", type=float, default=1.0, help="random negatives per positive (default 1: 50/50)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--site-column", action="store_true", help="add a `site` column")
    options = parser.parse_args(args)
    rows, summary = build_pairs(options.sites, tuple(options.fractions), options.negatives, options.seed)
    paths = write_pairs(rows, options.out, options.format, options.site_column)
    print("\n".join(summary.lines() + [f"wrote {path}" for path in paths]))
