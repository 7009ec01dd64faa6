"""Summarise py-spy profiles recorded by ``python -m bench --profile DIR``.

py-spy's raw format has one line per distinct stack, ``frame;frame;... count``,
root first. This prints the functions with the most samples of their own
(self) and the most samples anywhere on the stack (inclusive), grouped by a
module prefix if asked::

    python -m bench.profile DIR/sagaflow-throughput-3-*.txt --top 25
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``pkg/mod.py:func``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match['func']}"


def callers(paths: list[Path], target: str, depth: int) -> Counter[str]:
    """Where samples whose leaf frame contains ``target`` come from: the first
    frame of sagaflow (or bench) code above it, ``depth`` frames of context."""
    found: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            frames = [_short(f) for f in stack.split(";") if f.strip()]
            if not frames or target not in frames[-1]:
                continue
            ours = [f for f in frames if f.startswith(("sagaflow/", "bench/"))]
            found[" <- ".join(reversed(ours[-depth:])) or "<no sagaflow frame>"] += int(count_text)
    return found


def summarise(paths: list[Path]) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short(f) for f in stack.split(";") if f.strip()]
            frames = [f for f in frames if not f.startswith("process ") and "thread" not in f[:8]]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
            by_package[_package(frames[-1])] += count
    return total, own, inclusive, by_package


def _package(frame: str) -> str:
    path = frame.split(":", 1)[0]
    if path.startswith("sagaflow/"):
        return "/".join(path.split("/")[:2])
    return path.split("/", 1)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--callers", help="show where samples of this leaf function come from")
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)
    if args.callers:
        found = callers(args.files, args.callers, args.depth)
        grand = sum(found.values()) or 1
        for name, count in found.most_common(args.top):
            print(f"  {100 * count / grand:5.1f}%  {name}")
        return
    total, own, inclusive, by_package = summarise(args.files)
    if not total:
        print("no samples")
        return
    print(f"{total} samples")
    print("\nself time by package/module:")
    for name, count in by_package.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\nself time:")
    for name, count in own.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\ninclusive time:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
