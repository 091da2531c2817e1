"""The Stack Exchange pair builder on two real dump sites, trimmed (tests/fixtures/stackexchange/), with counts
checked by hand.

The fixture keeps every duplicate link of the two full dumps, the posts they name, 30 more questions per site
and one post of each other type (trim_stackexchange_dump.py). By hand (grep over the XML): bicycles.meta has
46 questions with titles, 25 links, 10 duplicate links, one of which (1219 -> 1109) points at a post missing
from Posts.xml; quantumcomputing has 53 questions, 36 links and 14 duplicate links, three of which (1463,
3805 twice) point at missing posts. No usable pair has equal titles or repeats, so 9 + 11 = 20 positives.
"""

import tracemalloc

import pytest

from minilm_sts.data.stackexchange import build_pairs, iter_rows, write_pairs
from minilm_sts.errors import DumpError

from helpers import FIXTURES, cli

SITES = sorted((FIXTURES / "stackexchange").iterdir())


@pytest.fixture(scope="module")
def built():
    return build_pairs(SITES, show_progress=False)


def test_counts_match_the_files(built):
    rows, summary = built
    assert summary.sites == ["bicycles.meta.stackexchange.com", "quantumcomputing.stackexchange.com"]
    assert (summary.questions, summary.links, summary.duplicate_links) == (46 + 53, 25 + 36, 10 + 14)
    assert summary.dropped == {"link to a missing or non-question post": 4}
    assert (summary.positives, summary.negatives) == (20, 20)
    assert summary.per_split == {"train": 32, "dev": 4, "test": 4}
    per_site = {}
    for split_rows in rows.values():
        for _, _, label, site in split_rows:
            per_site[site] = per_site.get(site, 0) + (label == 1.0)
    assert per_site == {"bicycles.meta.stackexchange.com": 9, "quantumcomputing.stackexchange.com": 11}


def test_labels_balanced_and_no_title_crosses_splits(built):
    rows, _ = built
    every = [row for split_rows in rows.values() for row in split_rows]
    assert sum(row[2] for row in every) == len(every) / 2
    titles = {split: {t.lower() for a, b, *_ in split_rows for t in (a, b)} for split, split_rows in rows.items()}
    assert (not titles["train"] & titles["dev"] and not titles["train"] & titles["test"]
            and not titles["dev"] & titles["test"])
    assert all(a.lower() != b.lower() for a, b, *_ in every)
    assert len({frozenset((a.lower(), b.lower())) for a, b, *_ in every}) == len(every)  # nothing repeated


def test_negatives_are_not_linked_in_any_way(built):
    rows, _ = built
    positives = {frozenset((a.lower(), b.lower()))
                 for split_rows in rows.values() for a, b, y, _ in split_rows if y == 1.0}
    for split_rows in rows.values():
        for a, b, label, _ in split_rows:
            if label == 0.0:
                assert frozenset((a.lower(), b.lower())) not in positives


def test_same_seed_same_output_and_other_seed_differs(built, tmp_path):
    rows, _ = built
    again, _ = build_pairs(SITES, show_progress=False)
    assert again == rows
    other, _ = build_pairs(SITES, seed=7, show_progress=False)
    assert other != rows
    first = [p.read_bytes() for p in write_pairs(rows, tmp_path / "a")]
    second = [p.read_bytes() for p in write_pairs(again, tmp_path / "b")]
    assert first == second and not list((tmp_path / "a").glob(".*partial"))


def test_negative_ratio_is_configurable():
    rows, summary = build_pairs(SITES, negatives_per_positive=2.0, show_progress=False)
    assert summary.negatives + summary.dropped.get("negative not found", 0) == 40


def test_output_formats_read_back_as_training_data(built, tmp_path):
    from minilm_sts.data.pairs import read_pairs

    rows, _ = built
    for fmt in ("tsv", "jsonl", "parquet"):
        paths = write_pairs(rows, tmp_path / fmt, fmt, with_site=True)
        assert sum(len(read_pairs(str(p))) for p in paths) == 40


def test_bad_dumps(tmp_path):
    with pytest.raises(DumpError, match="site folder not found"):
        build_pairs([tmp_path / "nowhere"], show_progress=False)
    site = tmp_path / "broken.stackexchange.com"
    site.mkdir()
    (site / "Posts.xml").write_text('<posts><row Id="1" PostTypeId="1" Title="a"/>')
    with pytest.raises(DumpError, match="PostLinks.xml: file not found"):
        build_pairs([site], show_progress=False)
    (site / "PostLinks.xml").write_text("<postlinks></postlinks>")
    with pytest.raises(DumpError, match="Posts.xml: malformed XML"):
        build_pairs([site], show_progress=False)
    (site / "Posts.xml").write_text('<posts><row Id="1" PostTypeId="1" Title="a"/></posts>')
    with pytest.raises(DumpError, match="no duplicate pairs in any site") as err:
        build_pairs([site], show_progress=False)
    assert "broken.stackexchange.com has no usable duplicate links" in str(err.value)


def test_posts_are_streamed_with_bounded_memory(tmp_path):
    """A 40 MB Posts.xml is read with a few MB of Python allocations: elements are cleared as they go."""
    path = tmp_path / "Posts.xml"
    body = "x" * 2000
    with open(path, "w") as handle:
        handle.write("<posts>\n")
        for i in range(20000):
            handle.write(f'  <row Id="{i}" PostTypeId="2" Body="{body}" />\n')
        handle.write("</posts>\n")
    tracemalloc.start()
    assert sum(1 for _ in iter_rows(path)) == 20000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20 < path.stat().st_size / 4


def test_a_bad_dump_on_the_command_line_is_one_error_line(tmp_path):
    """DumpError is a UserInputError: `build-pairs` says what is wrong in one line, exit status 2, no traceback."""
    result = cli("build-pairs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "pairs"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: site folder not found"
    assert not any(line.startswith(("Traceback", "  File")) for line in result.stderr.splitlines())
    assert not (tmp_path / "pairs").exists()
