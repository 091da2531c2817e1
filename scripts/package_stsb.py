"""Rebuild the STS Benchmark copy shipped inside the package (minilm_sts/data/stsb/*.tsv.gz).

Columns become `sentence_0, sentence_1, label` with label = score / 5, so the packaged default trains with
label_scale 1.0 like every other recipe. Usage: python scripts/package_stsb.py ../shared/data/stsb
"""

import csv
import gzip
import io
import sys
from pathlib import Path

from minilm_sts.data.pairs import PairTable, read_pairs

STSB_TOP_SCORE = 5.0


def main(source_dir: str) -> None:
    out_dir = Path(__file__).resolve().parents[1] / "minilm_sts" / "data" / "stsb"
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        table = read_pairs(str(Path(source_dir) / f"{split}.tsv"), label_scale=STSB_TOP_SCORE)
        with open(out_dir / f"{split}.tsv.gz", "wb") as raw_file:
            # mtime=0 keeps the archive byte-identical across rebuilds.
            with gzip.GzipFile(fileobj=raw_file, mode="wb", mtime=0) as archive:
                archive.write(_to_tsv(table).encode("utf-8"))
        print(f"{split}: {len(table)} pairs")


def _to_tsv(table: PairTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["sentence_0", "sentence_1", "label"])
    writer.writerows(zip(table.sentences_a, table.sentences_b, (repr(y) for y in table.labels)))
    return buffer.getvalue()


if __name__ == "__main__":
    main(sys.argv[1])
