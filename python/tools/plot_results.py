"""Plots a masked_conv2d result table (CSV written by `python -m dynconv_ext bench --out DIR`).

    python python/tools/plot_results.py benchmarks/results/masked_conv2d_cpu.csv [--out plot.png] [--title T]
"""
import argparse
import csv

from dynconv_ext.profile.masked_conv_table import plot


def load_rows(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("layer", "mask"):
                r[k] = float(v)
        r["batch"] = int(r["batch"])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--out", help="PNG path (default: the CSV's path with .png)")
    p.add_argument("--title", default=None)
    p.add_argument("--batch", type=int, default=None, help="only this batch size")
    args = p.parse_args()
    rows = load_rows(args.csv)
    if args.batch is not None:
        rows = [r for r in rows if r["batch"] == args.batch]
    out = args.out or args.csv.rsplit(".", 1)[0] + ".png"
    if not plot(rows, out, title=args.title):
        raise SystemExit("matplotlib is not installed: pip install matplotlib")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
