"""Summarise a py-spy collapsed-stack file: `python -m benchmarks.topstacks FILE [N]`.

Prints the functions with the most samples on top of the stack (self) and
anywhere in the stack (inclusive), as a share of all samples.
"""
from __future__ import annotations

import sys
from collections import Counter


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_c[frames[-1]] += c
        for frame in set(frames):
            incl[frame] += c
    print(f"{total} samples")
    for title, counter in (("self", self_c), ("inclusive", incl)):
        print(f"\n-- top {n} by {title} --")
        for frame, c in counter.most_common(n):
            print(f"{100 * c / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
