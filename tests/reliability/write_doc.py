"""Write docs/reliability.md from the summary the reliability suite left (see conftest.py).

    python tests/reliability/write_doc.py SUMMARY.md docs/reliability.md
"""
import datetime
import sys

HEADER = """# Reliability and security checks

`make reliability` runs `tests/reliability/` (also part of `make test`): each check drives the real
`medtl` CLI on tiny synthetic data on CPU, injects a fault or a bad input, and asserts what must
hold afterwards. This page is rewritten from the suite's summary table by `make reliability`.

Last run: {date}.

"""


def main(summary: str, out: str) -> None:
    table = open(summary, encoding="utf-8").read()
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(HEADER.format(date=datetime.date.today().isoformat()) + table)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
